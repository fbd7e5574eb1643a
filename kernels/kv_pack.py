"""Packing KV rows into their deployed bytes (kernels/kv_format.py layouts), one launch each.

`pack_main` (main entries):
One program per row: per group of 64 nope values the UE8M0 scale (the smallest power of two that
keeps the group's largest magnitude within 448, from the float's exponent bits), then each value
times its inverse (exact) rounded to E4M3 (nearest, ties to even) with integer bit arithmetic,
not a float8 cast or approximate exp2/log2, so the bytes equal torch's on any device; the rope
dims rounded to BF16 the same way; pad bytes 0.
`pack_index` (indexer keys): per group of 32 values the UE8M0 scale for 6, then each value's E2M1
nibble by comparison with the midpoints (ties down, as the reference), two per byte; with `rotate`
the row's Walsh-Hadamard rotation first (fp32 sums over the row, signs from popcount(i & j)).
Both write row i to row i of a new tensor, or in place to row rows[i] of a store (`out`, `rows`):
a step's closing entries go to their pages in the same launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4d.kernels.elementwise import normed, normed_pairs, rms_inv
from v4d.kernels.kv_format import FP4_GROUP, FP8_GROUP, index_bytes, main_bytes
from v4d.kernels.launch import pow2
from v4d.kernels.rownorm import RowNorm


@triton.jit
def _ceil_log2(v):
    """ceil(log2(v)) of positive fp32 v, clamped to [-127, 127] (exact, from the bits)."""
    bits = v.to(tl.int32, bitcast=True)
    exp = (bits >> 23) & 255
    e = exp - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    e = tl.where(exp == 0, tl.where(v > 2.0**-127, -126, -127), e)
    return tl.minimum(tl.maximum(e, -127), 127)


@triton.jit
def _e4m3_byte(y):
    """E4M3 (fn) byte of fp32 |y| <= 448, round to nearest even, sign kept (also of zero)."""
    bits = y.to(tl.int32, bitcast=True)
    sign = ((bits >> 31) & 1) << 7
    a = tl.abs(y)
    abits = a.to(tl.int32, bitcast=True)
    mant = abits & 0x7FFFFF
    q = mant >> 20
    rem = mant & 0xFFFFF
    q += ((rem > 0x80000) | ((rem == 0x80000) & ((q & 1) == 1))).to(tl.int32)
    normal = (((abits >> 23) & 255) - 127 + 7) * 8 + q  # carries into the exponent
    m = a * 512.0  # subnormals: steps of 2**-9
    f = tl.floor(m)
    r = m - f
    fi = f.to(tl.int32)
    sub = fi + ((r > 0.5) | ((r == 0.5) & ((fi & 1) == 1))).to(tl.int32)
    return sign | tl.where(a < 2.0**-6, sub, normal)


@triton.jit
def _store_bf16(ptr, v, ok):
    """The BF16 bits of fp32 v (nearest, ties to even) as two little-endian bytes at ptr."""
    r = v.to(tl.uint32, bitcast=True)
    b = (r + 0x7FFF + ((r >> 16) & 1)) >> 16
    tl.store(ptr, (b & 255).to(tl.uint8), mask=ok)
    tl.store(ptr + 1, (b >> 8).to(tl.uint8), mask=ok)


@triton.jit
def _pack_main_kernel(
    x_ptr,
    out_ptr,
    rows_ptr,
    w_ptr,
    pos_ptr,
    f_ptr,
    sx,
    so,
    eps,
    HAS_ROWS: tl.constexpr,
    NORM: tl.constexpr,
    HAS_W: tl.constexpr,
    ROTARY: tl.constexpr,
    NOPE: tl.constexpr,
    ROPE: tl.constexpr,
    G: tl.constexpr,
    WIDTH: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    dst = tl.load(rows_ptr + row).to(tl.int64) if HAS_ROWS else row.to(tl.int64)
    xrow, orow = x_ptr + row.to(tl.int64) * sx, out_ptr + dst * so
    ty = x_ptr.dtype.element_ty
    inv = rms_inv(xrow, NOPE + ROPE, eps, BLOCK_C) if NORM else 1.0
    c = tl.arange(0, GROUP)
    for g in range(G):
        offs = g * GROUP + c
        ok = offs < NOPE
        if NORM:  # the norm's output, rounded to x's dtype as rms_norm would store it
            x = normed(xrow, w_ptr, offs, ok, inv, HAS_W).to(ty).to(tl.float32)
        else:
            x = tl.load(xrow + offs, mask=ok, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), 0)
        e = _ceil_log2(tl.div_rn(tl.maximum(amax, 2.0**-126), 448.0))  # IEEE division, as torch's
        inv_s = ((127 - tl.minimum(e, 126)) << 23).to(tl.float32, bitcast=True)  # 2**-e, exact
        y = x * inv_s
        tl.store(orow + offs, _e4m3_byte(y).to(tl.uint8), mask=ok)
        tl.store(orow + NOPE + 2 * ROPE + g, (e + 127).to(tl.uint8))
    i = tl.arange(0, BLOCK_R)  # rope dims as pairs (2i, 2i + 1)
    ok = i < ROPE // 2
    even = NOPE + 2 * i
    if NORM:
        pos = tl.load(pos_ptr + row) if ROTARY else 0
        a, b = normed_pairs(xrow, w_ptr, even, ok, inv, pos, f_ptr, NOPE, HAS_W, ROTARY, ty)
        a, b = a.to(ty).to(tl.float32), b.to(ty).to(tl.float32)
    else:
        a = tl.load(xrow + even, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(xrow + even + 1, mask=ok, other=0.0).to(tl.float32)
    _store_bf16(orow + NOPE + 4 * i, a, ok)  # rope dim k's BF16 at bytes NOPE + 2k, NOPE + 2k + 1
    _store_bf16(orow + NOPE + 4 * i + 2, b, ok)
    p = NOPE + 2 * ROPE + G + tl.arange(0, 8)
    tl.store(orow + p, tl.zeros((8,), dtype=tl.uint8), mask=p < WIDTH)


def pack_main(
    x: torch.Tensor,
    rope_dim: int,
    out: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    norm: RowNorm | None = None,
) -> torch.Tensor:
    r, d = x.shape
    nope = d - rope_dim
    width = main_bytes(d, rope_dim)
    x = x if x.stride(1) == 1 else x.contiguous()  # rows at any stride (a column slice): in place
    out = torch.empty(r, width, dtype=torch.uint8, device=x.device) if out is None else out
    if r:
        w, pos, f = _norm_args(norm, out)
        _pack_main_kernel[(r,)](
            x,
            out,
            out if rows is None else rows,
            w,
            pos,
            f,
            x.stride(0),
            out.stride(0),
            norm.eps if norm is not None else 0.0,
            HAS_ROWS=rows is not None,
            NORM=norm is not None,
            HAS_W=norm is not None and norm.weight is not None,
            ROTARY=norm is not None and norm.rotary is not None,
            NOPE=nope,
            ROPE=rope_dim,
            G=-(-nope // FP8_GROUP),
            WIDTH=width,
            GROUP=FP8_GROUP,
            BLOCK_R=pow2(rope_dim // 2),
            BLOCK_C=min(pow2(d), 2048),  # rms_norm's, for the same sum of squares
        )
    return out


def _norm_args(norm: RowNorm | None, dummy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gain, positions and frequencies of a RowNorm as kernel arguments (any tensor where absent)."""
    if norm is None:
        return dummy, dummy, dummy
    pos, f = norm.rotary if norm.rotary is not None else (dummy, dummy)
    return norm.weight if norm.weight is not None else dummy, pos, f.contiguous()  # upcast as loaded


@triton.jit
def _e2m1_code(y):
    """E2M1 nibble of fp32 |y| <= 6: the nearest magnitude, ties down (as `torch.bucketize`), sign bit 3."""
    a = tl.abs(y)
    code = (
        (a > 0.25).to(tl.int32)
        + (a > 0.75).to(tl.int32)
        + (a > 1.25).to(tl.int32)
        + (a > 1.75).to(tl.int32)
        + (a > 2.5).to(tl.int32)
        + (a > 3.5).to(tl.int32)
        + (a > 5.0).to(tl.int32)
    )
    return code | ((y < 0).to(tl.int32) << 3)


@triton.jit
def _hadamard_signs(i, j):
    """[len(i), len(j)] entries (-1)^popcount(i & j) of the Sylvester Hadamard matrix, as fp32."""
    p = i[:, None] & j[None, :]
    p ^= p >> 16
    p ^= p >> 8
    p ^= p >> 4
    p ^= p >> 2
    p ^= p >> 1
    return 1.0 - 2.0 * (p & 1).to(tl.float32)


@triton.jit
def _pack_index_kernel(
    x_ptr,
    out_ptr,
    rows_ptr,
    w_ptr,
    pos_ptr,
    f_ptr,
    sx,
    so,
    eps,
    start,
    HAS_ROWS: tl.constexpr,
    ROTATE: tl.constexpr,
    NORM: tl.constexpr,
    HAS_W: tl.constexpr,
    ROTARY: tl.constexpr,
    D: tl.constexpr,
    G: tl.constexpr,
    HALF_GROUP: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    dst = tl.load(rows_ptr + row).to(tl.int64) if HAS_ROWS else row.to(tl.int64)
    xrow, orow = x_ptr + row.to(tl.int64) * sx, out_ptr + dst * so
    ty = x_ptr.dtype.element_ty
    if NORM:  # rms_norm's factor, and its RoPE from channel `start` on
        inv = rms_inv(xrow, D, eps, BLOCK_C)
        pos = tl.load(pos_ptr + row) if ROTARY else 0
    if ROTATE:  # the whole row, for y = H x (Sylvester H[i, j] = (-1)^popcount(i & j) / sqrt(D))
        j = tl.arange(0, D)
        if NORM:  # channel j of its pair (j & ~1, j | 1), as the norm (and RoPE) would store it
            a, b = normed_pairs(xrow, w_ptr, j - j % 2, j < D, inv, pos, f_ptr, start, HAS_W, ROTARY, ty)
            x = tl.where(j % 2 == 1, b, a).to(ty).to(tl.float32)
        else:
            x = tl.load(xrow + j).to(tl.float32)
    for g in range(G):
        i = g * HALF_GROUP + tl.arange(0, HALF_GROUP)  # byte i holds elements 2i, 2i+1
        ok = 2 * i < D
        if ROTATE:
            xe = tl.sum(_hadamard_signs(2 * i, j) * x[None, :], 1) * (1.0 / tl.sqrt(D * 1.0))
            xo = tl.sum(_hadamard_signs(2 * i + 1, j) * x[None, :], 1) * (1.0 / tl.sqrt(D * 1.0))
        elif NORM:
            xe, xo = normed_pairs(xrow, w_ptr, 2 * i, ok, inv, pos, f_ptr, start, HAS_W, ROTARY, ty)
            xe, xo = xe.to(ty).to(tl.float32), xo.to(ty).to(tl.float32)
        else:
            xe = tl.load(xrow + 2 * i, mask=ok, other=0.0).to(tl.float32)
            xo = tl.load(xrow + 2 * i + 1, mask=ok, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(xe), 0), tl.max(tl.abs(xo), 0))
        e = _ceil_log2(tl.div_rn(tl.maximum(amax, 2.0**-126), 6.0))
        inv_s = ((127 - tl.minimum(e, 126)) << 23).to(tl.float32, bitcast=True)
        byte = _e2m1_code(xe * inv_s) | (_e2m1_code(xo * inv_s) << 4)
        tl.store(orow + i, byte.to(tl.uint8), mask=ok)
        tl.store(orow + D // 2 + g, (e + 127).to(tl.uint8))


def pack_index(
    x: torch.Tensor,
    out: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    rotate: bool = False,
    norm: RowNorm | None = None,
) -> torch.Tensor:
    r, d = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()  # rows at any stride (a column slice): in place
    out = torch.empty(r, index_bytes(d), dtype=torch.uint8, device=x.device) if out is None else out
    if r:
        w, pos, f = _norm_args(norm, out)
        rotary = norm is not None and norm.rotary is not None
        _pack_index_kernel[(r,)](
            x,
            out,
            out if rows is None else rows,
            w,
            pos,
            f,
            x.stride(0),
            out.stride(0),
            norm.eps if norm is not None else 0.0,
            d - 2 * f.shape[0] if rotary else d,
            HAS_ROWS=rows is not None,
            ROTATE=rotate,
            NORM=norm is not None,
            HAS_W=norm is not None and norm.weight is not None,
            ROTARY=rotary,
            D=d,
            G=-(-d // FP4_GROUP),
            HALF_GROUP=FP4_GROUP // 2,
            BLOCK_C=min(pow2(d), 2048),  # rms_norm's, for the same sum of squares
        )
    return out
