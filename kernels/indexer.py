"""The lightning indexer: head-weighted ReLU scores over visible compressed keys, and top-k.

Scores: one program per (query token, block of keys); the key block is loaded once and reused by
every block of indexer heads. Blocks wholly past the token's visible count only write -inf.

Top-k: a select without sorting, one program per block of rows (one row on a GPU, all rows in the
interpreter). Scores map to int32 keys that order like the floats; a 32-step binary search finds
the k-th largest key (each step counts the keys at or above a candidate), then one pass writes
every index above it plus enough ties (lowest index first), in ascending index order. The result is
a set; consumers do not depend on its order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4d.kernels.launch import dot_dtype, interpreting, pow2


@triton.jit
def _indexer_scores_kernel(
    q_ptr,
    w_ptr,
    k_ptr,
    nvis_ptr,
    out_ptr,
    H,
    S,
    D,
    sq_t,
    sq_h,
    sw_t,
    sw_h,
    sk,
    so_t,
    BLOCK_H: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)  # row offsets can pass 2**31
    s0 = tl.program_id(1) * BLOCK_S
    offs_s = s0 + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    n_vis = tl.load(nvis_ptr + t)
    visible = offs_s < n_vis
    acc = tl.zeros([BLOCK_S], tl.float32)
    if s0 < n_vis:
        keys = tl.load(
            k_ptr + offs_s[:, None] * sk + offs_d[None, :], mask=visible[:, None] & (offs_d < D)[None, :], other=0.0
        ).to(DOT)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            h_ok = offs_h < H
            q = tl.load(
                q_ptr + t * sq_t + offs_h[:, None] * sq_h + offs_d[None, :],
                mask=h_ok[:, None] & (offs_d < D)[None, :],
                other=0.0,
            ).to(tl.float32)
            w = tl.load(w_ptr + t * sw_t + offs_h * sw_h, mask=h_ok, other=0.0).to(tl.float32)
            s = tl.dot(q.to(DOT), tl.trans(keys), input_precision="ieee")  # [BLOCK_H, BLOCK_S]
            acc += tl.sum(tl.maximum(s, 0.0) * w[:, None], 0)
    tl.store(out_ptr + t * so_t + offs_s, tl.where(visible, acc, float("-inf")), mask=offs_s < S)


def indexer_scores(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, n_visible: torch.Tensor) -> torch.Tensor:
    t, h, d = q.shape
    s = k.shape[0]
    q, k = q.contiguous(), k.contiguous()
    n_visible = n_visible.to(device=q.device, dtype=torch.int32).contiguous()
    out = torch.empty(t, s, dtype=torch.float32, device=q.device)
    if t == 0 or s == 0:
        return out
    if interpreting():
        block_s, block_h = min(pow2(s, 16), 256), min(pow2(h, 16), 64)
    elif dot_dtype(q) == tl.float32:  # FMA dots: small tiles keep them out of local memory
        block_s, block_h = 32, 16
    else:
        block_s, block_h = 64, min(pow2(h, 16), 64)
    _indexer_scores_kernel[(t, triton.cdiv(s, block_s))](
        q,
        w,
        k,
        n_visible,
        out,
        h,
        s,
        d,
        q.stride(0),
        q.stride(1),
        w.stride(0),
        w.stride(1),
        k.stride(0),
        out.stride(0),
        BLOCK_H=block_h,
        BLOCK_S=block_s,
        BLOCK_D=pow2(d, 16),
        DOT=dot_dtype(q),
        num_warps=4,
    )
    return out


@triton.jit
def _indexer_topk_kernel(scores_ptr, out_ptr, T, S, K, ss, so, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < T
    # Per row, tau = the largest key in [INT32_MIN + 1, INT32_MAX] with count(key >= tau) >= K (the
    # lower end when fewer than K scores are finite: then every finite score is taken).
    # Passes 0..31 binary-search tau, pass 32 counts the keys above it (the ties still needed follow),
    # pass 33 writes. One loop, so the key mapping and the row scan are written once.
    lo = tl.full([BLOCK_R], -2147483647, tl.int64)
    hi = tl.full([BLOCK_R], 2147483647, tl.int64)
    ties_left = tl.zeros([BLOCK_R], tl.int64)
    written = tl.zeros([BLOCK_R], tl.int64)
    for it in range(34):
        tau = tl.where(it < 32, (lo + hi + 1) // 2, lo + 1)
        n = tl.zeros([BLOCK_R], tl.int64)
        for s0 in range(0, S, BLOCK_S):
            offs = s0 + tl.arange(0, BLOCK_S)
            x = tl.load(
                scores_ptr + rows[:, None] * ss + offs[None, :],
                mask=row_ok[:, None] & (offs < S)[None, :],
                other=float("-inf"),
            )
            # int32 keys ordered like the floats; -inf and NaN get INT32_MIN (never selected).
            bits = x.to(tl.int32, bitcast=True)
            key = tl.where(x > float("-inf"), bits ^ ((bits >> 31) & 0x7FFFFFFF), -2147483648).to(tl.int64)
            n += tl.sum((key >= tau[:, None]).to(tl.int64), 1)
            if it == 33:
                tie = (key == lo[:, None]).to(tl.int64)
                tie_rank = tl.cumsum(tie, 1) - tie  # earlier ties in this block
                take = ((key > lo[:, None]) | ((tie == 1) & (tie_rank < ties_left[:, None]))).to(tl.int64)
                pos = written[:, None] + tl.cumsum(take, 1) - 1
                tl.store(
                    out_ptr + rows[:, None] * so + pos, offs[None, :] + tl.zeros_like(pos).to(tl.int32), mask=take == 1
                )
                written += tl.sum(take, 1)
                ties_left -= tl.sum(tie * take, 1)
        if it < 32:
            enough = n >= K
            lo = tl.where(enough, tau, lo)
            hi = tl.where(enough, hi, tau - 1)
        elif it == 32:
            ties_left = K - n


def indexer_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    t, s = scores.shape
    out = torch.full((t, k), -1, dtype=torch.int32, device=scores.device)
    if t == 0 or s == 0 or k == 0:
        return out
    scores = scores.float().contiguous()
    if interpreting():  # all rows in one program: the interpreter pays per program and per op
        block_r, block_s = min(pow2(t), 64), min(pow2(s, 16), 1024)
    else:
        block_r, block_s = 1, min(pow2(s, 16), 1024)
    _indexer_topk_kernel[(triton.cdiv(t, block_r),)](
        scores, out, t, s, k, scores.stride(0), out.stride(0), BLOCK_R=block_r, BLOCK_S=block_s, num_warps=4
    )
    return out
