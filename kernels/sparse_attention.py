"""Sparse attention with a per-head sink over per-query index lists (-1 = masked).

One program per (query token, block of heads): it gathers the token's selected K=V rows block by
block and runs an online (flash-style) softmax. The sink is the softmax's starting point (running
max = sink, running sum = 1, accumulator = 0), so a row with no valid index ends as 0 / 1 = 0 and no
-inf arithmetic is ever needed. The same kernel serves decode (T = batch) and prefill (T = tokens),
and every layer kind: the caller's index list is the window + compressed-entry union.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4d.kernels.launch import dot_dtype, interpreting, pow2

LOG2E = 1.4426950408889634


@triton.jit
def _sparse_attention_kernel(
    q_ptr,
    kv_ptr,
    idx_ptr,
    sink_ptr,
    o_ptr,
    H,
    K,
    D,
    qk_scale,
    sq_t,
    sq_h,
    skv,
    sidx,
    so_t,
    so_h,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)  # row offsets can pass 2**31
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok, d_ok = offs_h < H, offs_d < D
    q = tl.load(
        q_ptr + t * sq_t + offs_h[:, None] * sq_h + offs_d[None, :], mask=h_ok[:, None] & d_ok[None, :], other=0.0
    ).to(tl.float32)
    q = (q * qk_scale).to(DOT)  # qk_scale includes log2(e): exp2 below
    m = tl.load(sink_ptr + offs_h, mask=h_ok, other=0.0)  # sink * log2(e)
    den = tl.full([BLOCK_H], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ids = tl.load(idx_ptr + t * sidx + offs_k, mask=offs_k < K, other=-1)
        ok = ids >= 0
        rows = tl.load(
            kv_ptr + ids.to(tl.int64)[:, None] * skv + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0
        ).to(DOT)
        s = tl.dot(q, tl.trans(rows), input_precision="ieee")
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        den = den * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), rows, input_precision="ieee")
        m = m_new
    o = acc / den[:, None]
    tl.store(
        o_ptr + t * so_t + offs_h[:, None] * so_h + offs_d[None, :],
        o.to(o_ptr.dtype.element_ty),
        mask=h_ok[:, None] & d_ok[None, :],
    )


def sparse_attention(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float
) -> torch.Tensor:
    t, h, d = q.shape
    q, kv, idx = q.contiguous(), kv.contiguous(), idx.to(torch.int32).contiguous()
    o = torch.empty_like(q)
    k = idx.shape[1]
    if t == 0 or h == 0:
        return o
    if interpreting():  # few, large programs: the interpreter pays per program
        block_h, block_k, warps = pow2(h, 16), min(pow2(k, 16), 128), 4
    else:
        block_h, block_k, warps = 16, (32 if d > 128 else 64), 8
    block_h = min(block_h, 64)
    grid = (t, triton.cdiv(h, block_h))
    _sparse_attention_kernel[grid](
        q,
        kv,
        idx,
        (sink.float() * LOG2E).contiguous(),
        o,
        h,
        k,
        d,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        kv.stride(0),
        idx.stride(0),
        o.stride(0),
        o.stride(1),
        BLOCK_H=block_h,
        BLOCK_K=block_k,
        BLOCK_D=pow2(d, 16),
        DOT=dot_dtype(q),
        num_warps=warps,
    )
    return o
