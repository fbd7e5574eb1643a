"""The lightning indexer's top-k (its scores are kernels/paged.py's paged_indexer_scores).

A select without sorting, one program per block of rows (one row on a GPU, all rows in the
interpreter). Scores map to int32 keys that order like the floats; a 32-step binary search finds
the k-th largest key (each step counts the keys at or above a candidate), then one pass writes
every index above it plus enough ties (lowest index first), in ascending index order. The result is
a set; consumers do not depend on its order. Slots left over get -1 in the same launch.

With a block table the kernel writes attention indices instead of entry numbers (entry s of row t
-> offset + table[seq[t], s // E] * E + s % E, its flattened page-store row past the step's rows
and rings) after a prefix of columns copied per row (the window's indices): the CSA layer's whole
attention index list, one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4d.kernels.launch import interpreting, pow2


@triton.jit
def _indexer_topk_kernel(
    scores_ptr,
    out_ptr,
    table_ptr,
    seq_ptr,
    prefix_ptr,
    T,
    S,
    K,
    W,
    E,
    offset,
    ss,
    so,
    st,
    sp,
    ROWS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < T
    for w0 in range(0, W, BLOCK_S):  # the prefix columns (W = 0 without one)
        offs = w0 + tl.arange(0, BLOCK_S)
        m = row_ok[:, None] & (offs < W)[None, :]
        v = tl.load(prefix_ptr + rows[:, None] * sp + offs[None, :], mask=m, other=-1)
        tl.store(out_ptr + rows[:, None] * so + offs[None, :], v.to(tl.int32), mask=m)
    if ROWS:
        tab = table_ptr + tl.load(seq_ptr + rows, mask=row_ok, other=0).to(tl.int64) * st
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
                pos = W + written[:, None] + tl.cumsum(take, 1) - 1
                val = offs[None, :] + tl.zeros_like(pos)
                if ROWS:
                    page = tl.load(tab[:, None] + val // E, mask=take == 1, other=0).to(tl.int64)
                    val = offset + page * E + val % E
                tl.store(out_ptr + rows[:, None] * so + pos, val.to(tl.int32), mask=take == 1)
                written += tl.sum(take, 1)
                ties_left -= tl.sum(tie * take, 1)
        if it < 32:
            enough = n >= K
            lo = tl.where(enough, tau, lo)
            hi = tl.where(enough, hi, tau - 1)
        elif it == 32:
            ties_left = K - n
    for k0 in range(0, K, BLOCK_S):  # unused slots
        offs = k0 + tl.arange(0, BLOCK_S)
        m = row_ok[:, None] & (offs[None, :] >= written[:, None]) & (offs < K)[None, :]
        tl.store(out_ptr + rows[:, None] * so + W + offs[None, :], tl.full([BLOCK_R, BLOCK_S], -1, tl.int32), mask=m)


def indexer_topk(
    scores: torch.Tensor,
    k: int,
    rows: tuple[torch.Tensor, torch.Tensor, int, int] | None = None,
    prefix: torch.Tensor | None = None,
) -> torch.Tensor:
    t, s = scores.shape
    w = 0 if prefix is None else prefix.shape[1]
    out = torch.empty((t, w + k), dtype=torch.int32, device=scores.device)
    if t == 0 or w + k == 0:
        return out
    scores = scores.float().contiguous()
    table, seq, per_page, offset = rows if rows is not None else (out, out, 1, 0)
    prefix = out if prefix is None else prefix
    if interpreting():  # all rows in one program: the interpreter pays per program and per op
        block_r, block_s = min(pow2(t), 64), min(pow2(s, 16), 1024)
    else:
        block_r, block_s = 1, min(pow2(s, 16), 1024)
    _indexer_topk_kernel[(triton.cdiv(t, block_r),)](
        scores,
        out,
        table,
        seq,
        prefix,
        t,
        s,
        k,
        w,
        per_page,
        offset,
        scores.stride(0),
        out.stride(0),
        table.stride(0),
        prefix.stride(0),
        ROWS=rows is not None,
        BLOCK_R=block_r,
        BLOCK_S=block_s,
        num_warps=4,
    )
    return out
