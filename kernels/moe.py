"""Routed experts: tokens sorted by expert, grouped GEMMs with the clamped SwiGLU, weighted combine.

1. On the device, with no host sync: the (token, slot) pairs whose expert is local are sorted by
   expert (stable argsort); per expert, a count and a start offset; tiles of BLOCK_M pairs, at most
   min(P, P / BLOCK_M + E) of them, so the grid is sized without reading the counts back.
2. `_expert_up_kernel`: per tile (one expert) and block of the intermediate dim, gathers the tile's
   token rows of x, multiplies by w1[e] and w3[e] over d and writes
   h = silu(min(w1 x, lim)) * clamp(w3 x, -lim, lim) in sorted order.
3. `_expert_down_kernel`: per tile and block of d, h @ w2[e]^T times the routing weight, written to
   the pair's own row (token-major), so no atomics and the result is deterministic.
4. `_combine_kernel`: per token, the sum of its local pairs' rows, cast to x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from v4d.kernels.launch import dot_dtype, interpreting, pow2


@triton.jit
def _tile_expert(tile_end_ptr, g, E, BLOCK_E: tl.constexpr):
    """Expert owning tile g: how many experts' tiles end at or before g (E when g is past the end)."""
    offs = tl.arange(0, BLOCK_E)
    ends = tl.load(tile_end_ptr + offs, mask=offs < E, other=2147483647)
    return tl.sum((ends <= g).to(tl.int32), 0)


@triton.jit
def _expert_up_kernel(
    x_ptr, order_ptr, start_ptr, count_ptr, tile_end_ptr, w1_ptr, w3_ptr, h_ptr,
    E, TOPK, Dm, Di, limit,
    sx, s1e, s1i, sh,
    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT: tl.constexpr,
):
    g = tl.program_id(0)
    e = _tile_expert(tile_end_ptr, g, E, BLOCK_E)
    if e < E:
        n_tiles = (tl.load(count_ptr + e) + BLOCK_M - 1) // BLOCK_M
        first = tl.load(tile_end_ptr + e) - n_tiles
        seg_end = tl.load(start_ptr + e) + tl.load(count_ptr + e)
        offs_m = tl.load(start_ptr + e) + (g - first) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < seg_end
        tok = tl.load(order_ptr + offs_m, mask=m_ok, other=0) // TOPK
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Di
        acc1 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc3 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        w_base = e.to(tl.int64) * s1e + offs_n[None, :] * s1i
        for k0 in range(0, Dm, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < Dm
            xb = tl.load(x_ptr + tok.to(tl.int64)[:, None] * sx + offs_k[None, :],
                         mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32).to(DOT)
            w_off = w_base + offs_k[:, None]
            w_ok = k_ok[:, None] & n_ok[None, :]
            w1b = tl.load(w1_ptr + w_off, mask=w_ok, other=0.0).to(tl.float32).to(DOT)
            w3b = tl.load(w3_ptr + w_off, mask=w_ok, other=0.0).to(tl.float32).to(DOT)
            acc1 += tl.dot(xb, w1b, input_precision="ieee")
            acc3 += tl.dot(xb, w3b, input_precision="ieee")
        if limit > 0:
            acc1 = tl.minimum(acc1, limit)
            acc3 = tl.minimum(tl.maximum(acc3, -limit), limit)
        h = acc1 * tl.sigmoid(acc1) * acc3
        tl.store(h_ptr + offs_m.to(tl.int64)[:, None] * sh + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _expert_down_kernel(
    h_ptr, order_ptr, start_ptr, count_ptr, tile_end_ptr, w2_ptr, wt_ptr, y_ptr,
    E, Dm, Di,
    sh, s2e, s2d, sy,
    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT: tl.constexpr,
):
    g = tl.program_id(0)
    e = _tile_expert(tile_end_ptr, g, E, BLOCK_E)
    if e < E:
        n_tiles = (tl.load(count_ptr + e) + BLOCK_M - 1) // BLOCK_M
        first = tl.load(tile_end_ptr + e) - n_tiles
        seg_end = tl.load(start_ptr + e) + tl.load(count_ptr + e)
        offs_m = tl.load(start_ptr + e) + (g - first) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < seg_end
        pair = tl.load(order_ptr + offs_m, mask=m_ok, other=0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Dm
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        w_base = e.to(tl.int64) * s2e + offs_n[None, :] * s2d
        for k0 in range(0, Di, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < Di
            hb = tl.load(h_ptr + offs_m.to(tl.int64)[:, None] * sh + offs_k[None, :],
                         mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32).to(DOT)
            w2b = tl.load(w2_ptr + w_base + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :],
                          other=0.0).to(tl.float32).to(DOT)
            acc += tl.dot(hb, w2b, input_precision="ieee")
        wt = tl.load(wt_ptr + pair, mask=m_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + pair.to(tl.int64)[:, None] * sy + offs_n[None, :], acc * wt[:, None],
                 mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _combine_kernel(ypair_ptr, ids_ptr, out_ptr, E, TOPK, Dm, sy, so,
                    BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0)
    offs_j = tl.arange(0, BLOCK_J)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ids = tl.load(ids_ptr + t * TOPK + offs_j, mask=offs_j < TOPK, other=-1)
    local = (ids >= 0) & (ids < E)
    rows = tl.load(ypair_ptr + (t * TOPK + offs_j).to(tl.int64)[:, None] * sy + offs_n[None, :],
                   mask=local[:, None] & (offs_n < Dm)[None, :], other=0.0)
    tl.store(out_ptr + t * so + offs_n, tl.sum(rows, 0).to(out_ptr.dtype.element_ty), mask=offs_n < Dm)


def moe_experts(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    swiglu_limit: float,
) -> torch.Tensor:
    t, d = x.shape
    topk = ids.shape[1]
    e, inter, _ = w1.shape
    out = torch.empty_like(x)
    pairs = t * topk
    if pairs == 0 or e == 0:
        return out.zero_()
    x, w1, w3, w2 = x.contiguous(), w1.contiguous(), w3.contiguous(), w2.contiguous()
    flat = ids.reshape(-1).to(torch.int64)
    expert = torch.where((flat >= 0) & (flat < e), flat, e)          # e = not local
    order = torch.argsort(expert, stable=True).to(torch.int32)
    count = torch.bincount(expert, minlength=e + 1)[:e]
    start = (torch.cumsum(count, 0) - count).to(torch.int32)
    if interpreting():
        bm, bn, bk, warps = 16, 64, 64, 4
    else:
        bm, bn, bk, warps = 64, 64, 64, 4
    tile_end = torch.cumsum(torch.div(count + bm - 1, bm, rounding_mode="floor"), 0).to(torch.int32)
    count = count.to(torch.int32)
    max_tiles = min(pairs, triton.cdiv(pairs, bm) + e)
    h = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)        # sorted order
    y_pairs = torch.empty(pairs, d, dtype=torch.float32, device=x.device)  # token-major
    dot = dot_dtype(x)
    _expert_up_kernel[(max_tiles, triton.cdiv(inter, bn))](
        x, order, start, count, tile_end, w1, w3, h,
        e, topk, d, inter, float(swiglu_limit),
        x.stride(0), w1.stride(0), w1.stride(1), h.stride(0),
        BLOCK_E=pow2(e), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT=dot, num_warps=warps,
    )
    _expert_down_kernel[(max_tiles, triton.cdiv(d, bn))](
        h, order, start, count, tile_end, w2, weights.float().reshape(-1).contiguous(), y_pairs,
        e, d, inter,
        h.stride(0), w2.stride(0), w2.stride(1), y_pairs.stride(0),
        BLOCK_E=pow2(e), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT=dot, num_warps=warps,
    )
    block_n = min(pow2(d), 1024) if interpreting() else 256
    _combine_kernel[(t, triton.cdiv(d, block_n))](
        y_pairs, flat, out, e, topk, d, y_pairs.stride(0), out.stride(0),
        BLOCK_J=pow2(topk), BLOCK_N=block_n, num_warps=4,
    )
    return out
