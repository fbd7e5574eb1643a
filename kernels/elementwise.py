"""Fused row-wise chains the model ran as many small torch ops: RMSNorm and interleaved RoPE.

`rms_norm`: one program per row, two passes over the channels in blocks (sum of squares, then
scale, gain and cast), so any width fits; with RoPE the last `dim` channels of the second pass are
rotated (as pairs loaded even / odd, rounded to the output dtype first as the norm's own output
would be) before the store, so a norm and its RoPE are one launch with the two ops' result.
`rope`: one program per (token, block of heads); the leading channels are copied, the last `dim`
ones rotated pairwise (2i, 2i+1) by pos * inv_freq[i] with cos/sin computed in the kernel (no angle
table). With `hadamard` each row, rotated and rounded as rope's output would be, is multiplied by the
normalised Walsh-Hadamard matrix (fp32 dot, fp32 output): the indexer query's two steps in one.
Both compute in fp32 and store the output dtype, like their references.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4d.kernels.kv_format import hadamard_matrix
from v4d.kernels.launch import pow2


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    pos_ptr,
    f_ptr,
    C,
    M,
    st,
    sx,
    so,
    eps,
    HAS_W: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    row = tl.program_id(0)
    x_row = x_ptr + (row // M) * st + (row % M) * sx  # M rows of sx per token, tokens st apart
    inv = rms_inv(x_row, C, eps, BLOCK_C)
    nope = C - 2 * HALF
    ty = out_ptr.dtype.element_ty
    for c0 in range(0, nope, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        y = normed(x_row, w_ptr, c, c < nope, inv, HAS_W)
        tl.store(out_ptr + row * so + c, y.to(ty), mask=c < nope)
    if HALF > 0:  # RoPE of the last 2 * HALF channels, pairs (2i, 2i+1), at the row's token position
        i = tl.arange(0, BLOCK_P)
        even = nope + 2 * i
        pos = tl.load(pos_ptr + row // M)
        a, b = normed_pairs(x_row, w_ptr, even, i < HALF, inv, pos, f_ptr, nope, HAS_W, True, ty)
        tl.store(out_ptr + row * so + even, a.to(ty), mask=i < HALF)
        tl.store(out_ptr + row * so + even + 1, b.to(ty), mask=i < HALF)


@triton.jit
def rms_inv(x_row, C, eps, BLOCK_C: tl.constexpr):
    """1 / rms of the C channels at x_row (+ eps), fp32: rms_norm's first pass, and the packers' (kv_pack.py)
    when they normalise the rows they pack, so both give the same factor."""
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        x = tl.load(x_row + c, mask=c < C, other=0.0).to(tl.float32)
        acc += x * x
    return 1.0 / tl.sqrt(tl.sum(acc, 0) / C + eps)


@triton.jit
def normed(x_row, w_ptr, c, ok, inv, HAS_W: tl.constexpr):
    """Channels c of the row at x_row times inv (and the gain), fp32 before the output's rounding."""
    y = tl.load(x_row + c, mask=ok, other=0.0).to(tl.float32) * inv
    if HAS_W:
        y = tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32) * y
    return y


@triton.jit
def normed_pairs(x_row, w_ptr, even, ok, inv, pos, f_ptr, start, HAS_W: tl.constexpr, ROTARY: tl.constexpr, ty):
    """Channels (even, even + 1) normalised (`normed`) and rounded to ty as the norm's output would be;
    with ROTARY the pairs from channel `start` on rotated by RoPE at pos (pair (even - start) // 2's
    frequency). fp32 values before the final rounding to ty."""
    a = normed(x_row, w_ptr, even, ok, inv, HAS_W).to(ty).to(tl.float32)
    b = normed(x_row, w_ptr, even + 1, ok, inv, HAS_W).to(ty).to(tl.float32)
    if ROTARY:
        rot = ok & (even >= start)
        ang = pos.to(tl.float32) * tl.load(f_ptr + (even - start) // 2, mask=rot, other=0.0).to(tl.float32)
        cos, sin = tl.cos(ang), tl.sin(ang)
        a, b = tl.where(rot, a * cos - b * sin, a), tl.where(rot, a * sin + b * cos, b)
    return a, b


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    dtype: torch.dtype,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    c = x.shape[-1]
    tokens = x.shape[0] if x.dim() > 1 else 1
    rows = x.numel() // c if c else 0
    m = rows // tokens if tokens else 1  # rows per token (its position's)
    if x.dim() > 1 and tokens and x[0].is_contiguous():  # tokens at any stride (a column slice): in place
        x2, st, sx = x, x.stride(0), c
    else:
        x2 = x.reshape(-1, c)
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        st, sx = m * x2.stride(0), x2.stride(0)
    out = torch.empty((rows, c), dtype=dtype, device=x.device)
    if rows:
        w = weight if weight is not None else out
        pos, f = rotary if rotary is not None else (out, out)
        half = f.shape[0] if rotary is not None else 0
        _rms_norm_kernel[(rows,)](
            x2,
            w,
            out,
            pos,
            f.contiguous() if rotary is not None else f,  # upcast as loaded
            c,
            m,
            st,
            sx,
            out.stride(0),
            eps,
            HAS_W=weight is not None,
            HALF=half,
            BLOCK_C=min(pow2(c), 2048),
            BLOCK_P=pow2(half),
        )
    return out.view(x.shape)


@triton.jit
def _rope_kernel(
    x_ptr,
    pos_ptr,
    f_ptr,
    h_ptr,
    out_ptr,
    M,
    C,
    st,
    sign,
    HEAD: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
    HADAMARD: tl.constexpr,
):
    t = tl.program_id(0)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    base = (t * M + m) * C  # [BLOCK_M] row starts (out)
    x_base = t * st + m * C  # x's: tokens st apart
    if HADAMARD:  # whole rows (C a power of two): rotated pairs as rotate_rows computes them, then x H
        c = tl.arange(0, BLOCK_H)
        ok = m_ok[:, None] & (c < C)[None, :]
        rot = (c >= HEAD) & (c < C)
        v = tl.load(x_ptr + x_base[:, None] + c[None, :], mask=ok, other=0.0).to(tl.float32)
        partner = tl.load(x_ptr + x_base[:, None] + (c ^ 1)[None, :], mask=ok & rot[None, :], other=0.0)
        partner = partner.to(tl.float32)
        y = rotate_tile(v, partner, c, rot, HEAD, tl.load(pos_ptr + t), f_ptr, sign)
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32)  # rope's output
        hm = tl.load(h_ptr + c[:, None] * C + c[None, :], mask=(c < C)[:, None] & (c < C)[None, :], other=0.0)
        tl.store(out_ptr + base[:, None] + c[None, :], tl.dot(y, hm, input_precision="ieee"), mask=ok)
    else:
        for c0 in range(0, HEAD, BLOCK_H):
            c = c0 + tl.arange(0, BLOCK_H)
            ok = m_ok[:, None] & (c < HEAD)[None, :]
            v = tl.load(x_ptr + x_base[:, None] + c[None, :], mask=ok, other=0.0)
            tl.store(out_ptr + base[:, None] + c[None, :], v, mask=ok)
        rotate_rows(x_ptr, out_ptr, x_base, base, m_ok, tl.load(pos_ptr + t), f_ptr, sign, HEAD, HALF, BLOCK_P)


@triton.jit
def rotate_tile(v, partner, c, rot, start, pos, f_ptr, sign):
    """RoPE of a tile [M, len(c)] whose column c holds v and partner its pair's other channel (c ^ 1):
    columns where `rot` (start even, so pair (2i, 2i + 1) from `start` on is columns (c, c ^ 1)) rotated
    by sign * pos * f[(c - start) // 2], the others v. The rope kernel's whole-row path and the
    attention's normalised query (paged.py)."""
    i = tl.where(rot, (c - start) // 2, 0)
    ang = pos.to(tl.float32) * tl.load(f_ptr + i, mask=rot, other=0.0).to(tl.float32)
    cos, sin = tl.cos(ang)[None, :], sign * tl.sin(ang)[None, :]
    odd = (c % 2 == 1)[None, :]
    y = tl.where(odd, partner * sin + v * cos, v * cos - partner * sin)
    return tl.where(rot[None, :], y, v)


@triton.jit
def rotate_rows(
    x_ptr,
    out_ptr,
    x_base,
    out_base,
    m_ok,
    pos,
    f_ptr,
    sign,
    HEAD: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """RoPE of rows x_base[m] (m_ok: in range) at position pos: channels HEAD + 2i, HEAD + 2i + 1 of x
    rotated by sign * pos * f[i], stored to rows out_base[m] of out (may be x's: each pair is loaded
    before it is stored).
    The rope kernel's, and the attention's for its output (paged.py)."""
    i = tl.arange(0, BLOCK_P)
    i_ok = i < HALF
    ang = pos.to(tl.float32) * tl.load(f_ptr + i, mask=i_ok, other=0.0).to(tl.float32)
    cos, sin = tl.cos(ang)[None, :], sign * tl.sin(ang)[None, :]
    ok = m_ok[:, None] & i_ok[None, :]
    even = HEAD + 2 * i[None, :]
    a = tl.load(x_ptr + x_base[:, None] + even, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + x_base[:, None] + even + 1, mask=ok, other=0.0).to(tl.float32)
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + out_base[:, None] + even, (a * cos - b * sin).to(ty), mask=ok)
    tl.store(out_ptr + out_base[:, None] + even + 1, (a * sin + b * cos).to(ty), mask=ok)


def rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, inverse: bool, hadamard: bool) -> torch.Tensor:
    # a token's rows contiguous, tokens at any stride (a column slice of a joined projection): in place
    x = x if x.shape[0] == 0 or x[0].is_contiguous() else x.contiguous()
    t, c, dim = x.shape[0], x.shape[-1], 2 * inv_freq.shape[0]
    m = x[0].numel() // c if t else 0
    out = torch.empty(x.shape, dtype=torch.float32 if hadamard else x.dtype, device=x.device)
    if t and m:
        block_m = 16 if hadamard else min(pow2(m), 16)  # tl.dot's least rows
        _rope_kernel[(t, triton.cdiv(m, block_m))](
            x,
            pos,
            inv_freq.contiguous(),  # upcast as loaded
            hadamard_matrix(c, x.device) if hadamard else out,
            out,
            m,
            c,
            x.stride(0),
            -1.0 if inverse else 1.0,
            HEAD=c - dim,
            HALF=dim // 2,
            BLOCK_M=block_m,
            BLOCK_H=pow2(c) if hadamard else min(pow2(max(c - dim, 1)), 128),
            BLOCK_P=pow2(dim // 2),
            HADAMARD=hadamard,
        )
    return out
