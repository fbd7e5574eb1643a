"""Triton kernels of the paged (batched) attention path: they read the window rings, the page store
and the compressor tail rings in place, through index tensors, in the cache's storage format.

Packed rows (kernels/kv_format.py) are decoded inline from their bytes: E4M3 by its bit fields
(sign, 4-bit exponent with bias 7, 3-bit mantissa; subnormal when the exponent is 0), BF16 rope dims
as the high half of an fp32, E2M1 by its 2-bit exponent and 1-bit mantissa, UE8M0 scales as
2**(byte - 127). Plain rows (fp32 / bf16) are loaded as they are.

- paged_sparse_attention: one program per (query row, block of heads, split of the row's indices),
  an online (flash-style) softmax started from the sink (running max = sink, running sum = 1), so a
  row with no valid index ends as 0 / 1 = 0, over one index space spanning fresh rows, rings and
  pages. Small batches split each row's indices across programs (flash-decoding) and merge the
  partial states in a second kernel.
- gated_pool_indexed: one program per (closing entry, block of channels); candidate slot l's gate
  gets the position bias ape[l % ratio] as it is loaded (the tail rings hold unbiased gates).
- paged_indexer_scores: one program per (query row, block of entries); an entry's key row comes
  from the row's block table.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4d.kernels.elementwise import rotate_rows, rotate_tile
from v4d.kernels.kv_format import FP4_GROUP, FP8_GROUP, index_bytes
from v4d.kernels.launch import dot_dtype, interpreting, pow2, split_reduction
from v4d.kernels.rownorm import RowNorm

LOG2E = 1.4426950408889634


@triton.jit
def _fp8_e4m3(b):
    """uint8 bytes (as int32) -> fp32 values."""
    e = (b >> 3) & 15
    m = (b & 7).to(tl.float32)
    mag = tl.where(e == 0, m * 0.001953125, (8.0 + m) * tl.exp2((e - 10).to(tl.float32)))
    return tl.where((b >> 7) == 1, -mag, mag)


@triton.jit
def _e2m1(nib):
    """4-bit codes (int32) -> fp32 values."""
    e = (nib >> 1) & 3
    m = (nib & 1).to(tl.float32)
    mag = tl.where(e == 0, m * 0.5, (1.0 + 0.5 * m) * tl.exp2((e - 1).to(tl.float32)))
    return tl.where((nib >> 3) == 1, -mag, mag)


@triton.jit
def _load_main(ptr, rows, ok, offs_d, D, stride, NOPE: tl.constexpr, PACKED: tl.constexpr, GROUP: tl.constexpr):
    """Rows [BLOCK_K] of a main-entry store -> fp32 [BLOCK_K, BLOCK_D] (0 where not ok)."""
    base = ptr + rows.to(tl.int64)[:, None] * stride
    d = offs_d[None, :]
    m = ok[:, None] & (d < D)
    if PACKED:
        is_nope = d < NOPE
        b = tl.load(base + d, mask=m & is_nope, other=0).to(tl.int32)
        e = tl.load(base + NOPE + 2 * (D - NOPE) + d // GROUP, mask=m & is_nope, other=127).to(tl.int32)
        nope = _fp8_e4m3(b) * tl.exp2((e - 127).to(tl.float32))
        r = d - NOPE
        lo = tl.load(base + NOPE + 2 * r, mask=m & (d >= NOPE), other=0).to(tl.int32)
        hi = tl.load(base + NOPE + 2 * r + 1, mask=m & (d >= NOPE), other=0).to(tl.int32)
        rope = ((hi << 24) | (lo << 16)).to(tl.float32, bitcast=True)
        return tl.where(is_nope, nope, rope)
    else:
        return tl.load(base + d, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _paged_attention_kernel(
    q_ptr,
    kv_ptr,
    ring_ptr,
    store_ptr,
    idx_ptr,
    sink_ptr,
    o_ptr,
    part_ptr,
    H,
    K,
    K_SPLIT,
    D,
    N,
    R,
    qk_scale,
    sq_t,
    sq_h,
    skv,
    sring,
    sstore,
    sidx,
    so_t,
    so_h,
    sp_s,
    sp_t,
    sp_h,
    pos_ptr,
    f_ptr,
    qw_ptr,
    qpos_ptr,
    qf_ptr,
    q_eps,
    NOPE: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_STORE: tl.constexpr,
    SPLIT: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT: tl.constexpr,
    ROT_HALF: tl.constexpr,
    BLOCK_P: tl.constexpr,
    Q_NORM: tl.constexpr,
    Q_W: tl.constexpr,
    Q_ROT_HALF: tl.constexpr,
):
    """Program (query row, block of heads, split): indices split*K_SPLIT.. of the row; with Q_NORM
    the query heads are first normalised (and roped) as `rms_norm` would store them. Unsplit it
    writes the output (then, with ROT_HALF, rotates its last 2 * ROT_HALF channels back by the row's
    position: the inverse RoPE); split, its partial state per head as [running max, sum, unnormalised
    output[0..D)] to part_ptr, merged by _attention_merge_kernel."""
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    sp = tl.program_id(2)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok, d_ok = offs_h < H, offs_d < D
    q_rows = q_ptr + t * sq_t + offs_h[:, None] * sq_h
    q_ok = h_ok[:, None] & d_ok[None, :]
    q = tl.load(q_rows + offs_d[None, :], mask=q_ok, other=0.0).to(tl.float32)
    if Q_NORM:
        q = _normed_heads(q, q_rows, q_ok, offs_d, D, q_eps, qw_ptr, qpos_ptr + t, qf_ptr, Q_W, Q_ROT_HALF)
    q = (q * qk_scale).to(DOT)
    m = tl.load(sink_ptr + offs_h, mask=h_ok, other=0.0).to(tl.float32) * 1.4426950408889634  # log2(e)
    # the sink's own weight is counted once: here unsplit, in the merge when split
    if SPLIT:
        den = tl.zeros([BLOCK_H], tl.float32)
    else:
        den = tl.full([BLOCK_H], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    k_lo = sp * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ids = tl.load(idx_ptr + t * sidx + offs_k, mask=offs_k < k_hi, other=-1).to(tl.int64)
        ok = ids >= 0
        fresh = ok & (ids < N)
        in_ring = (ids >= N) & (ids < N + R)
        rows = _load_main(kv_ptr, ids, fresh, offs_d, D, skv, NOPE, PACKED, GROUP)
        rows += _load_main(ring_ptr, ids - N, in_ring, offs_d, D, sring, NOPE, PACKED, GROUP)
        if HAS_STORE:
            rows += _load_main(store_ptr, ids - N - R, ids >= N + R, offs_d, D, sstore, NOPE, PACKED, GROUP)
        rows = rows.to(DOT)
        s = tl.dot(q, tl.trans(rows), input_precision="ieee")
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        den = den * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), rows, input_precision="ieee")
        m = m_new
    if SPLIT:
        base = part_ptr + sp.to(tl.int64) * sp_s + t * sp_t + offs_h.to(tl.int64) * sp_h
        tl.store(base, m, mask=h_ok)
        tl.store(base + 1, den, mask=h_ok)
        tl.store(base[:, None] + 2 + offs_d[None, :], acc, mask=h_ok[:, None] & d_ok[None, :])
    else:
        tl.store(
            o_ptr + t * so_t + offs_h[:, None] * so_h + offs_d[None, :],
            (acc / den[:, None]).to(o_ptr.dtype.element_ty),
            mask=h_ok[:, None] & d_ok[None, :],
        )
        if ROT_HALF > 0:  # the rows as stored, visible to the whole program after the barrier
            tl.debug_barrier()
            o_rows = t * so_t + offs_h * so_h
            rotate_rows(o_ptr, o_ptr, o_rows, o_rows, h_ok, tl.load(pos_ptr + t), f_ptr, -1.0,
                        D - 2 * ROT_HALF, ROT_HALF, BLOCK_P)  # fmt: skip


@triton.jit
def _normed_heads(q, q_rows, q_ok, offs_d, D, eps, w_ptr, pos_ptr, f_ptr, HAS_W: tl.constexpr, ROT_HALF: tl.constexpr):
    """Query heads q [BLOCK_H, BLOCK_D] (fp32, from rows q_rows) as `rms_norm(q, w, eps, q's dtype,
    rotary)` stores them: times 1 / rms per head (and the gain), rounded to q's dtype, the last
    2 * ROT_HALF channels rotated (partners reloaded as channels d ^ 1) and rounded again."""
    ty = q_rows.dtype.element_ty
    inv = 1.0 / tl.sqrt(tl.sum(q * q, 1) / D + eps)
    y = q * inv[:, None]
    if HAS_W:
        y = tl.load(w_ptr + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)[None, :] * y
    y = y.to(ty).to(tl.float32)
    if ROT_HALF > 0:
        rot = (offs_d >= D - 2 * ROT_HALF) & (offs_d < D)
        partner = tl.load(q_rows + (offs_d ^ 1)[None, :], mask=q_ok & rot[None, :], other=0.0).to(tl.float32)
        partner = partner * inv[:, None]
        if HAS_W:
            partner = tl.load(w_ptr + (offs_d ^ 1), mask=rot, other=0.0).to(tl.float32)[None, :] * partner
        partner = partner.to(ty).to(tl.float32)
        y = rotate_tile(y, partner, offs_d, rot, D - 2 * ROT_HALF, tl.load(pos_ptr), f_ptr, 1.0)
        y = y.to(ty).to(tl.float32)
    return y


@triton.jit
def _attention_merge_kernel(
    part_ptr,
    sink_ptr,
    o_ptr,
    H,
    D,
    S,
    sp_s,
    sp_t,
    sp_h,
    so_t,
    so_h,
    pos_ptr,
    f_ptr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROT_HALF: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Program (query row, block of heads): the splits' partial states merged as the unsplit
    kernel's online softmax would have, starting from the sink (max = sink, sum = 1); the output
    rotated back as the unsplit kernel does."""
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok, d_ok = offs_h < H, offs_d < D
    m = tl.load(sink_ptr + offs_h, mask=h_ok, other=0.0).to(tl.float32) * 1.4426950408889634  # log2(e)
    den = tl.full([BLOCK_H], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for sp in range(0, S):
        base = part_ptr + sp * sp_s + t * sp_t + offs_h.to(tl.int64) * sp_h
        m_s = tl.load(base, mask=h_ok, other=0.0)
        den_s = tl.load(base + 1, mask=h_ok, other=0.0)
        acc_s = tl.load(base[:, None] + 2 + offs_d[None, :], mask=h_ok[:, None] & d_ok[None, :], other=0.0)
        m_new = tl.maximum(m, m_s)
        a, b = tl.exp2(m - m_new), tl.exp2(m_s - m_new)
        den = den * a + den_s * b
        acc = acc * a[:, None] + acc_s * b[:, None]
        m = m_new
    tl.store(
        o_ptr + t * so_t + offs_h[:, None] * so_h + offs_d[None, :],
        (acc / den[:, None]).to(o_ptr.dtype.element_ty),
        mask=h_ok[:, None] & d_ok[None, :],
    )
    if ROT_HALF > 0:
        tl.debug_barrier()
        o_rows = t * so_t + offs_h * so_h
        rotate_rows(o_ptr, o_ptr, o_rows, o_rows, h_ok, tl.load(pos_ptr + t), f_ptr, -1.0,
                    D - 2 * ROT_HALF, ROT_HALF, BLOCK_P)  # fmt: skip


def attention_blocks(h: int, d: int, itemsize: int) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_K, warps, stages) of the compiled attention kernel. 16-bit rows of 512 dims
    (V4's single KV head): all heads of a query in one program, so each selected row is loaded once
    per query, not once per 16 heads (fastest of 11 configs timed on an H200, docs/kernels.md: 0.36
    against 0.90 ms for 64 queries x 64 heads x 640 rows); fp32 rows: 16 heads x 16 rows keeps the
    tiles in Hopper's 227 KB of shared memory."""
    if d <= 128:
        return 16, 64, 8, 3
    return (64, 32, 8, 1) if itemsize < 4 else (16, 16, 8, 3)


def paged_sparse_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    ring: torch.Tensor,
    store: torch.Tensor | None,
    idx: torch.Tensor,
    sink: torch.Tensor,
    scale: float,
    rope_dim: int,
    unrotate: tuple[torch.Tensor, torch.Tensor] | None = None,
    q_norm: RowNorm | None = None,
) -> torch.Tensor:
    t, h, d = q.shape
    packed = ring.dtype == torch.uint8
    pos, f = unrotate if unrotate is not None else (idx, sink)  # RoPE frequencies upcast as loaded
    rot_half = f.shape[0] if unrotate is not None else 0
    if (store is not None and (store.dtype == torch.uint8) != packed) or (kv.dtype == torch.uint8) != packed:
        raise ValueError("paged_sparse_attention: kv, ring and store must share one storage format")
    q = q if q.stride(2) == 1 else q.contiguous()  # tokens and heads at any stride (a column slice): in place
    kv, idx = kv.contiguous(), idx.contiguous()  # int32 or int64 indices, read as they are
    ring = ring.contiguous()
    store_t = store.contiguous() if store is not None else ring
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    qw = q_norm.weight if q_norm is not None and q_norm.weight is not None else sink
    qpos, qf = q_norm.rotary if q_norm is not None and q_norm.rotary is not None else (pos, f)
    k = idx.shape[1]
    if t == 0 or h == 0:
        return o
    if interpreting():
        block_h, block_k, warps, stages = min(pow2(h, 16), 64), min(pow2(k, 16), 128), 4, 1
    else:
        block_h, block_k, warps, stages = attention_blocks(h, d, q.element_size())
    hb = triton.cdiv(h, block_h)
    per = split_reduction(t * hb, k, block_k, q.device)  # flash-decoding for small batches
    splits = triton.cdiv(k, per)
    part = torch.empty(splits, t, h, 2 + d, dtype=torch.float32, device=q.device) if splits > 1 else o
    sink = sink.contiguous()  # scaled by log2(e) in the kernels
    _paged_attention_kernel[(t, hb, splits)](
        q,
        kv,
        ring,
        store_t,
        idx,
        sink,
        o,
        part,
        h,
        k,
        per,
        d,
        kv.shape[0],
        ring.shape[0],
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        kv.stride(0),
        ring.stride(0),
        store_t.stride(0),
        idx.stride(0),
        o.stride(0),
        o.stride(1),
        part.stride(0),
        part.stride(1),
        part.stride(2),
        pos,
        f,
        qw,
        qpos,
        qf.contiguous(),  # upcast as loaded
        q_norm.eps if q_norm is not None else 0.0,
        NOPE=d - rope_dim,
        PACKED=packed,
        HAS_STORE=store is not None,
        SPLIT=splits > 1,
        GROUP=FP8_GROUP,
        BLOCK_H=block_h,
        BLOCK_K=block_k,
        BLOCK_D=pow2(d, 16),
        DOT=dot_dtype(q),
        ROT_HALF=0 if splits > 1 else rot_half,
        BLOCK_P=pow2(rot_half),
        Q_NORM=q_norm is not None,
        Q_W=q_norm is not None and q_norm.weight is not None,
        Q_ROT_HALF=qf.shape[0] if q_norm is not None and q_norm.rotary is not None else 0,
        num_warps=warps,
        num_stages=stages,
    )
    if splits > 1:
        merge_h = min(pow2(h, 16), 16)
        _attention_merge_kernel[(t, triton.cdiv(h, merge_h))](
            part,
            sink,
            o,
            h,
            d,
            splits,
            part.stride(0),
            part.stride(1),
            part.stride(2),
            o.stride(0),
            o.stride(1),
            pos,
            f,
            BLOCK_H=merge_h,
            BLOCK_D=pow2(d, 16),
            ROT_HALF=rot_half,
            BLOCK_P=pow2(rot_half),
            num_warps=4,
        )
    return o


@triton.jit
def _gated_pool_indexed_kernel(
    kv_ptr,
    sc_ptr,
    skv_ptr,
    ssc_ptr,
    idx_ptr,
    ape_ptr,
    o_ptr,
    N,
    L,
    C,
    M,
    s_kv,
    s_sc,
    s_skv,
    s_ssc,
    s_idx,
    s_ape,
    s_o,
    OVERLAP: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    e = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_l = tl.arange(0, BLOCK_L)
    ids = tl.load(idx_ptr + e * s_idx + offs_l, mask=offs_l < L, other=-1).to(tl.int64)
    col = offs_c[None, :]
    if OVERLAP:  # the second half of the candidates reads the second branch's channels
        col = col + tl.where(offs_l >= L // 2, C, 0)[:, None]
    c_ok = (offs_c < C)[None, :]
    fresh = ((ids >= 0) & (ids < N))[:, None] & c_ok
    tail = (ids >= N)[:, None] & c_ok
    g = tl.load(sc_ptr + ids[:, None] * s_sc + col, mask=fresh, other=0.0).to(tl.float32)
    g += tl.load(ssc_ptr + (ids - N)[:, None] * s_ssc + col, mask=tail, other=0.0).to(tl.float32)
    v = tl.load(kv_ptr + ids[:, None] * s_kv + col, mask=fresh, other=0.0).to(tl.float32)
    v += tl.load(skv_ptr + (ids - N)[:, None] * s_skv + col, mask=tail, other=0.0).to(tl.float32)
    ape = tl.load(ape_ptr + (offs_l % M)[:, None] * s_ape + col, mask=(offs_l < L)[:, None] & c_ok, other=0.0)
    g += ape.to(tl.float32)
    g = tl.where(fresh | tail, g, float("-inf"))
    mx = tl.max(g, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    ex = tl.exp(g - mx[None, :])
    den = tl.sum(ex, 0)
    num = tl.sum(ex * v, 0)
    out = tl.where(den > 0, num / tl.maximum(den, 1e-30), 0.0)
    tl.store(o_ptr + e * s_o + offs_c, out.to(o_ptr.dtype.element_ty), mask=offs_c < C)


def gated_pool_indexed(
    kv: torch.Tensor,
    score: torch.Tensor,
    state_kv: torch.Tensor,
    state_score: torch.Tensor,
    idx: torch.Tensor,
    overlap: bool,
    ape: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    n, w = kv.shape
    e, length = idx.shape
    c = w // 2 if overlap else w
    # row-strided views (the model passes column halves of one projection / tail) are read in place
    kv, score, state_kv, state_score = (
        t if t.stride(1) == 1 else t.contiguous() for t in (kv, score, state_kv, state_score)
    )
    idx, ape = idx.contiguous(), ape.contiguous()  # ape upcast as loaded
    out = torch.empty(e, c, dtype=dtype, device=kv.device)
    if e == 0 or c == 0:
        return out
    block_l = pow2(length)
    block_c = min(pow2(c), 1024) if interpreting() else max(16, min(pow2(c), 8192 // block_l))
    _gated_pool_indexed_kernel[(e, triton.cdiv(c, block_c))](
        kv,
        score,
        state_kv,
        state_score,
        idx,
        ape,
        out,
        n,
        length,
        c,
        ape.shape[0],
        kv.stride(0),
        score.stride(0),
        state_kv.stride(0),
        state_score.stride(0),
        idx.stride(0),
        ape.stride(0),
        out.stride(0),
        OVERLAP=overlap,
        BLOCK_L=block_l,
        BLOCK_C=block_c,
        num_warps=4,
    )
    return out


@triton.jit
def _paged_indexer_scores_kernel(
    q_ptr,
    w_ptr,
    k_ptr,
    bt_ptr,
    seq_ptr,
    nvis_ptr,
    out_ptr,
    H,
    S,
    D,
    E,
    P,
    sq_t,
    sq_h,
    sw_t,
    sw_h,
    sk,
    sbt,
    so_t,
    w_scale,
    PACKED: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    s0 = tl.program_id(1) * BLOCK_S
    offs_s = s0 + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    n_vis = tl.load(nvis_ptr + t)
    visible = offs_s < n_vis
    acc = tl.zeros([BLOCK_S], tl.float32)
    if s0 < n_vis:
        b = tl.load(seq_ptr + t).to(tl.int64)
        page = tl.load(bt_ptr + b * sbt + offs_s // E, mask=visible & (offs_s // E < P), other=0).to(tl.int64)
        base = k_ptr + (page * E + offs_s % E)[:, None] * sk
        d = offs_d[None, :]
        m = visible[:, None] & (d < D)
        if PACKED:
            byte = tl.load(base + d // 2, mask=m, other=0).to(tl.int32)
            nib = tl.where(d % 2 == 0, byte & 15, byte >> 4)
            e = tl.load(base + D // 2 + d // GROUP, mask=m, other=127).to(tl.int32)
            keys = _e2m1(nib) * tl.exp2((e - 127).to(tl.float32))
        else:
            keys = tl.load(base + d, mask=m, other=0.0).to(tl.float32)
        keys = keys.to(DOT)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            h_ok = offs_h < H
            q = tl.load(
                q_ptr + t * sq_t + offs_h[:, None] * sq_h + offs_d[None, :],
                mask=h_ok[:, None] & (offs_d < D)[None, :],
                other=0.0,
            ).to(tl.float32)
            w = tl.load(w_ptr + t * sw_t + offs_h * sw_h, mask=h_ok, other=0.0).to(tl.float32) * w_scale
            s = tl.dot(q.to(DOT), tl.trans(keys), input_precision="ieee")
            acc += tl.sum(tl.maximum(s, 0.0) * w[:, None], 0)
    tl.store(out_ptr + t * so_t + offs_s, tl.where(visible, acc, float("-inf")), mask=offs_s < S)


def paged_indexer_scores(
    q: torch.Tensor,
    w: torch.Tensor,
    keys: torch.Tensor,
    block_table: torch.Tensor,
    seq: torch.Tensor,
    n_visible: torch.Tensor,
    w_scale: float = 1.0,
) -> torch.Tensor:
    t, h, d = q.shape
    e = keys.shape[1]
    nb, p = block_table.shape
    s = p * e
    packed = keys.dtype == torch.uint8
    if packed and keys.shape[2] != index_bytes(d):
        raise ValueError(f"paged_indexer_scores: packed keys of {index_bytes(d)} B expected")
    q, keys = q.contiguous(), keys.contiguous()  # w: read through its strides
    # integer metadata in whatever width the step holds it (no cast launches); a column slice of the
    # block table is read through its row stride
    block_table = block_table if block_table.stride(1) == 1 else block_table.contiguous()
    seq, n_visible = seq.contiguous(), n_visible.contiguous()
    out = torch.empty(t, s, dtype=torch.float32, device=q.device)
    if t == 0 or s == 0:
        return out
    if interpreting():
        block_s, block_h = min(pow2(s, 16), 256), min(pow2(h, 16), 64)
    elif dot_dtype(q) == tl.float32:
        block_s, block_h = 32, 16
    else:
        block_s, block_h = 64, min(pow2(h, 16), 64)
    _paged_indexer_scores_kernel[(t, triton.cdiv(s, block_s))](
        q,
        w,
        keys,
        block_table,
        seq,
        n_visible,
        out,
        h,
        s,
        d,
        e,
        p,
        q.stride(0),
        q.stride(1),
        w.stride(0),
        w.stride(1),
        keys.stride(1),
        block_table.stride(0),
        out.stride(0),
        w_scale,
        PACKED=packed,
        GROUP=FP4_GROUP,
        BLOCK_H=block_h,
        BLOCK_S=block_s,
        BLOCK_D=pow2(d, 16),
        DOT=dot_dtype(q),
        num_warps=4,
    )
    return out
