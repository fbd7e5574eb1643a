"""Gated pooling of the token-level compressor (CSA and HCA).

values/gates are [B, L, C]: B entries being closed, L candidate tokens each, C channels. CSA passes
L = 8 (the previous block's 4 tokens from the first branch and the current block's 4 from the
second, -inf gates for the padded slots of entry 0); HCA passes L = 128. Prefill closes many
entries at once (B = blocks in the chunk); decode closes one per sequence whose block just filled
(B = those sequences). One program per (entry, channel block) holds all L candidates, takes the
per-channel softmax over L in fp32 and writes the weighted sum; an all -inf channel gives 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4d.kernels.launch import interpreting, pow2


@triton.jit
def _gated_pool_kernel(
    v_ptr,
    g_ptr,
    o_ptr,
    L,
    C,
    sv_b,
    sv_l,
    sg_b,
    sg_l,
    so_b,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # row offsets can pass 2**31
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_l = tl.arange(0, BLOCK_L)
    ok = (offs_l < L)[:, None] & (offs_c < C)[None, :]
    g = tl.load(g_ptr + b * sg_b + offs_l[:, None] * sg_l + offs_c[None, :], mask=ok, other=float("-inf")).to(
        tl.float32
    )
    v = tl.load(v_ptr + b * sv_b + offs_l[:, None] * sv_l + offs_c[None, :], mask=ok, other=0.0).to(tl.float32)
    m = tl.max(g, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    e = tl.exp(g - m[None, :])
    den = tl.sum(e, 0)
    num = tl.sum(e * v, 0)
    out = tl.where(den > 0, num / tl.maximum(den, 1e-30), 0.0)
    tl.store(o_ptr + b * so_b + offs_c, out.to(o_ptr.dtype.element_ty), mask=offs_c < C)


def gated_pool(values: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    b, length, c = values.shape
    values, gates = values.contiguous(), gates.contiguous()
    out = torch.empty(b, c, dtype=values.dtype, device=values.device)
    if b == 0 or c == 0:
        return out
    block_l = pow2(length)
    # Keep BLOCK_L * BLOCK_C at 8K elements on a GPU (HCA: 128 x 64); whole rows in the interpreter.
    block_c = min(pow2(c), 1024) if interpreting() else max(16, min(pow2(c), 8192 // block_l))
    _gated_pool_kernel[(b, triton.cdiv(c, block_c))](
        values,
        gates,
        out,
        length,
        c,
        values.stride(0),
        values.stride(1),
        gates.stride(0),
        gates.stride(1),
        out.stride(0),
        BLOCK_L=block_l,
        BLOCK_C=block_c,
        num_warps=4,
    )
    return out
