"""Routed experts: tokens sorted by expert, grouped GEMMs with the clamped SwiGLU, weighted combine.

1. On the device, with no host sync, in one launch (`_tile_schedule_kernel`): per local expert a
   count of its (token, slot) pairs and a start offset, the pairs sorted by expert (a stable
   counting sort), then a tile schedule of BLOCK_M pairs per tile (expert, first row, end row). A
   GPU launch sizes the grid by the bound min(P, P / BLOCK_M + E) and surplus tiles exit at once;
   in the interpreter the exact count is read.
2. `_expert_up_kernel`: per tile (one expert) and block of the intermediate dim, gathers the tile's
   token rows of x, multiplies by w1[e] and w3[e] over d and writes
   h = silu(min(w1 x, lim)) * clamp(w3 x, -lim, lim) in sorted order (x's dtype, as the official
   expert casts before w2).
3. `_expert_down_kernel`: per tile and block of d, h @ w2[e]^T times the routing weight, written to
   the pair's own row (token-major), so no atomics and the result is deterministic.
4. `_combine_kernel`: per token, the sum of its local pairs' rows, cast to x's dtype (then, with
   `add`, plus that row of `add`: another output added without a launch of its own).

`dense_expert` (the shared expert: one expert, every token, weight 1) runs steps 2 and 3 alone with
`DENSE`: tile g is tokens g * BLOCK_M.. in order, and the down kernel writes the output rows as the
combine would (rounded to x's dtype, then `add`), so 2 launches give the 4-launch result bit for bit.

With packed MXFP4 weights (`scales` given: int8 [E, out, in/2], two E2M1 codes per byte, and a UE8M0
scale per 32 inputs) steps 2 and 3 read the packed bytes and decode each weight tile in registers
(`_fp4_tile`) before the dot, so only the packed bytes cross the memory bus.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4d.kernels.launch import dot_dtype, gpu_sms, interpreting, pow2


@triton.jit
def _fp4_tile(w_ptr, s_ptr, row_off, s_row_off, offs_k, mask):
    """Decode a tile of packed MXFP4 weights to fp32: byte k//2, nibble k%2 (even k low), times
    2^(scale[k//32] - 127). E2M1: code = sign | exp(2) | mantissa(1); exp 0 is subnormal (0, 0.5)."""
    byte = tl.load(w_ptr + row_off + offs_k // 2, mask=mask, other=0).to(tl.int32) & 0xFF
    code = (byte >> ((offs_k % 2) * 4)) & 0xF
    e = (code >> 1) & 3
    m = (code & 1).to(tl.float32)
    mag = tl.where(e == 0, m * 0.5, (1.0 + m * 0.5) * tl.exp2((e - 1).to(tl.float32)))
    s = tl.load(s_ptr + s_row_off + offs_k // 32, mask=mask, other=127).to(tl.int32) & 0xFF
    return tl.where(code >= 8, -mag, mag) * tl.exp2(s.to(tl.float32) - 127.0)


@triton.jit
def _tile_rows(g, order_ptr, tile_row_ptr, tile_end_ptr, M, BLOCK_M: tl.constexpr, DENSE: tl.constexpr):
    """Tile g's rows, which of them are real, and each row's pair: sorted pairs from the schedule, or
    with DENSE tokens g * BLOCK_M.. of M in order (row = pair = token)."""
    if DENSE:
        offs_m = g * BLOCK_M + tl.arange(0, BLOCK_M)
        return offs_m, offs_m < M, offs_m
    else:
        offs_m = tl.load(tile_row_ptr + g) + tl.arange(0, BLOCK_M)
        m_ok = offs_m < tl.load(tile_end_ptr + g)
        return offs_m, m_ok, tl.load(order_ptr + offs_m, mask=m_ok, other=0)


@triton.jit
def _store_out(out_ptr, add_ptr, y, rows, offs_n, so, sa, ok, ADD: tl.constexpr):
    """y rounded to out's dtype; with ADD plus add's rows as torch adds two tensors (in fp32, the sum
    rounded once)."""
    y = y.to(out_ptr.dtype.element_ty)
    if ADD:
        a = tl.load(add_ptr + rows[:, None] * sa + offs_n[None, :], mask=ok, other=0.0)
        y = y.to(tl.float32) + a.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * so + offs_n[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _expert_up_kernel(
    x_ptr,
    order_ptr,
    tile_e_ptr,
    tile_row_ptr,
    tile_end_ptr,
    w1_ptr,
    w3_ptr,
    h_ptr,
    s1_ptr,
    s3_ptr,
    TOPK,
    M,
    Dm,
    Di,
    limit,
    sx,
    s1e,
    s1i,
    sh,
    ss_e,
    ss_i,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT: tl.constexpr,
    FP4: tl.constexpr,
    DENSE: tl.constexpr,
):
    g = tl.program_id(0)
    e = 0 if DENSE else tl.load(tile_e_ptr + g)  # DENSE: one expert, every tile real
    if e >= 0:
        offs_m, m_ok, pair = _tile_rows(g, order_ptr, tile_row_ptr, tile_end_ptr, M, BLOCK_M, DENSE)
        tok = pair // TOPK
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Di
        acc1 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc3 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        w_base = tl.cast(e, tl.int64) * s1e + offs_n[None, :] * s1i
        s_base = tl.cast(e, tl.int64) * ss_e + offs_n[None, :] * ss_i
        for k0 in range(0, Dm, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < Dm
            xb = tl.load(
                x_ptr + tok.to(tl.int64)[:, None] * sx + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0
            ).to(DOT)
            w_ok = k_ok[:, None] & n_ok[None, :]
            if FP4:
                w1b = _fp4_tile(w1_ptr, s1_ptr, w_base, s_base, offs_k[:, None], w_ok).to(DOT)
                w3b = _fp4_tile(w3_ptr, s3_ptr, w_base, s_base, offs_k[:, None], w_ok).to(DOT)
            else:
                w_off = w_base + offs_k[:, None]
                w1b = tl.load(w1_ptr + w_off, mask=w_ok, other=0.0).to(DOT)
                w3b = tl.load(w3_ptr + w_off, mask=w_ok, other=0.0).to(DOT)
            acc1 += tl.dot(xb, w1b, input_precision="ieee")
            acc3 += tl.dot(xb, w3b, input_precision="ieee")
        if limit > 0:
            acc1 = tl.minimum(acc1, limit)
            acc3 = tl.minimum(tl.maximum(acc3, -limit), limit)
        h = acc1 * tl.sigmoid(acc1) * acc3
        tl.store(
            h_ptr + offs_m.to(tl.int64)[:, None] * sh + offs_n[None, :],
            h.to(h_ptr.dtype.element_ty),
            mask=m_ok[:, None] & n_ok[None, :],
        )


@triton.jit
def _expert_down_kernel(
    h_ptr,
    order_ptr,
    tile_e_ptr,
    tile_row_ptr,
    tile_end_ptr,
    w2_ptr,
    wt_ptr,
    y_ptr,
    s2_ptr,
    add_ptr,
    TOPK,
    M,
    Dm,
    Di,
    swt,
    swt_j,
    sh,
    s2e,
    s2d,
    sy,
    ss_e,
    ss_d,
    sa,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT: tl.constexpr,
    FP4: tl.constexpr,
    DENSE: tl.constexpr,
    ADD: tl.constexpr,
):
    g = tl.program_id(0)
    e = 0 if DENSE else tl.load(tile_e_ptr + g)  # DENSE: one expert, every tile real
    if e >= 0:
        offs_m, m_ok, pair = _tile_rows(g, order_ptr, tile_row_ptr, tile_end_ptr, M, BLOCK_M, DENSE)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Dm
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        w_base = tl.cast(e, tl.int64) * s2e + offs_n[None, :] * s2d
        s_base = tl.cast(e, tl.int64) * ss_e + offs_n[None, :] * ss_d
        for k0 in range(0, Di, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < Di
            hb = tl.load(
                h_ptr + offs_m.to(tl.int64)[:, None] * sh + offs_k[None, :],
                mask=m_ok[:, None] & k_ok[None, :],
                other=0.0,
            ).to(DOT)
            w_ok = k_ok[:, None] & n_ok[None, :]
            if FP4:
                w2b = _fp4_tile(w2_ptr, s2_ptr, w_base, s_base, offs_k[:, None], w_ok).to(DOT)
            else:
                w2b = tl.load(w2_ptr + w_base + offs_k[:, None], mask=w_ok, other=0.0).to(DOT)
            acc += tl.dot(hb, w2b, input_precision="ieee")
        ok = m_ok[:, None] & n_ok[None, :]
        if DENSE:  # the token's output row, as the combine makes it from the token's one pair of weight 1
            _store_out(y_ptr, add_ptr, acc, pair.to(tl.int64), offs_n, sy, sa, ok, ADD)
        else:
            wt = tl.load(wt_ptr + (pair // TOPK).to(tl.int64) * swt + (pair % TOPK) * swt_j, mask=m_ok, other=0.0)
            tl.store(
                y_ptr + pair.to(tl.int64)[:, None] * sy + offs_n[None, :], acc * wt.to(tl.float32)[:, None], mask=ok
            )


@triton.jit
def _combine_kernel(
    ypair_ptr,
    ids_ptr,
    add_ptr,
    out_ptr,
    T,
    E,
    TOPK,
    Dm,
    sy,
    sid,
    sid_j,
    sa,
    so,
    ADD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_j = tl.arange(0, BLOCK_J)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    pair = offs_t[:, None] * TOPK + offs_j[None, :]  # [t, j]
    ids = tl.load(
        ids_ptr + offs_t[:, None] * sid + offs_j[None, :] * sid_j,
        mask=(offs_t < T)[:, None] & (offs_j < TOPK)[None, :],
        other=-1,
    )
    local = (ids >= 0) & (ids < E)
    rows = tl.load(
        ypair_ptr + pair.to(tl.int64)[:, :, None] * sy + offs_n[None, None, :],
        mask=local[:, :, None] & (offs_n < Dm)[None, None, :],
        other=0.0,
    )
    ok = (offs_t < T)[:, None] & (offs_n < Dm)[None, :]
    _store_out(out_ptr, add_ptr, tl.sum(rows, 1), offs_t, offs_n, so, sa, ok, ADD)


@triton.jit
def _local_onehot(ids_ptr, offs, P, TOPK, sid, sid_j, E, e):
    """[pairs, E_PAD] int32: 1 where pair offs[i] (ids[p // TOPK, p % TOPK]) goes to local expert e[j]."""
    ex = tl.load(ids_ptr + (offs // TOPK).to(tl.int64) * sid + (offs % TOPK) * sid_j, mask=offs < P, other=-1)
    return ((ex[:, None] == e[None, :]) & ((ex >= 0) & (ex < E))[:, None]).to(tl.int32)


@triton.jit
def _tile_schedule_kernel(
    ids_ptr, order_ptr, tile_e_ptr, tile_row_ptr, tile_end_ptr, P, TOPK, sid, sid_j, E, BM, G,
    E_PAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    """One program: per local expert the count of its pairs (ids outside [0, E) are not local), their
    start in sorted order, each local pair's row in that order (stable counting sort: its expert's
    start plus the earlier pairs of that expert), BM-row tiles per expert, then for tile g < G the
    tile's expert (-1 past the real tiles), first row and end row. Every per-expert value is a vector
    of E_PAD lanes; the tile's expert is the number of experts whose tiles end at or before g
    (searchsorted), its values picked by a one-hot sum, so nothing is gathered and nothing syncs with
    the host."""
    e = tl.arange(0, E_PAD)
    count = tl.zeros([E_PAD], tl.int32)
    for p0 in range(0, P, BLOCK_P):
        count += tl.sum(_local_onehot(ids_ptr, p0 + tl.arange(0, BLOCK_P), P, TOPK, sid, sid_j, E, e), 0)
    local = e < E
    start = tl.cumsum(count, 0) - count
    seen = start  # per expert: the next free row in sorted order
    for p0 in range(0, P, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        hot = _local_onehot(ids_ptr, offs, P, TOPK, sid, sid_j, E, e)
        row = tl.sum(hot * (seen[None, :] + tl.cumsum(hot, 0) - hot), 1)
        tl.store(order_ptr + row, offs, mask=tl.sum(hot, 1) > 0)
        seen += tl.sum(hot, 0)
    tiles = (count + BM - 1) // BM
    ends = tl.cumsum(tiles, 0)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        te = tl.sum((local[None, :] & (ends[None, :] <= g[:, None])).to(tl.int32), 1)
        pick = e[None, :] == tl.minimum(te, E - 1)[:, None]
        start_e = tl.sum(tl.where(pick, start[None, :], 0), 1)
        first = tl.sum(tl.where(pick, ends[None, :] - tiles[None, :], 0), 1)
        end = start_e + tl.sum(tl.where(pick, count[None, :], 0), 1)
        ok = g < G
        tl.store(tile_e_ptr + g, tl.where(te < E, te, -1), mask=ok)
        tl.store(tile_row_ptr + g, start_e + (g - first) * BM, mask=ok)
        tl.store(tile_end_ptr + g, end, mask=ok)


def _tile_schedule(ids: torch.Tensor, e: int, bm: int, bound: int):
    """The (token, slot) pairs of ids [T, k] (any strides; ids outside [0, e) not local) sorted by
    expert, and tiles of BLOCK_M sorted pairs, `bound` of them (the grid size, no host sync): (pair
    per sorted row, local rows only; expert per tile, -1 for surplus tiles; first row; end row),
    int32, in one launch."""
    pairs = ids.numel()
    order = torch.empty(pairs, dtype=torch.int32, device=ids.device)
    tile_e, tile_row, tile_end = (torch.empty(bound, dtype=torch.int32, device=ids.device) for _ in range(3))
    e_pad = pow2(e + 1, 16)
    block = max(16, min(64, 8192 // e_pad))  # [block, e_pad] one-hot tiles of at most 8K lanes
    _tile_schedule_kernel[(1,)](
        ids, order, tile_e, tile_row, tile_end, pairs, ids.shape[1], ids.stride(0), ids.stride(1), e, bm, bound,
        E_PAD=e_pad, BLOCK_P=block, BLOCK_G=block, num_warps=4,
    )  # fmt: skip
    return order, tile_e, tile_row, tile_end


def expert_tiles(pairs: int, e: int, d: int, inter: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N up, BLOCK_N down, BLOCK_K, warps, stages) of the expert kernels; compiled: 8
    warps, no register spills (sm_90); interpreted: few programs and loop steps (it pays per op)."""
    if interpreting():
        return 16, min(pow2(inter, 16), 256), min(pow2(d, 16), 256), 128, 4, 1
    return 64, 64, 64, 64, 8, 3


def _up_down(
    x: torch.Tensor,
    w: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    s: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    swiglu_limit: float,
    tiles: tuple[int, int, int, int, int, int],
    n_tiles: int,
    rows: int,
    schedule: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
    weights: torch.Tensor | None,
    y: torch.Tensor,
    add: torch.Tensor | None = None,
) -> None:
    """The up and down launches over `n_tiles` tiles of `rows` rows: the (token, slot) pairs of
    weights [T, k] sorted by `schedule` (order, tile expert, first row, end row) into y's fp32 pair
    rows; or with no schedule (DENSE) x's tokens in order through expert 0 into y = the output rows
    (x's dtype, plus `add`). w = (w1, w3, w2) contiguous [E, ...]; s: their MXFP4 scales' bytes."""
    d, inter = x.shape[1], w[0].shape[1]
    bm, bn_up, bn_down, bk, warps, stages = tiles
    dense = schedule is None
    order, tile_e, tile_row, tile_end = (x, x, x, x) if dense else schedule  # DENSE reads none of them
    topk = 1 if dense else weights.shape[1]
    w1, w3, w2 = w
    s1, s3, s2 = (w1, w1, w1) if s is None else s
    h = torch.empty(rows, inter, dtype=x.dtype, device=x.device)  # in tile order
    dot = dot_dtype(x)
    _expert_up_kernel[(n_tiles, triton.cdiv(inter, bn_up))](
        x, order, tile_e, tile_row, tile_end, w1, w3, h, s1, s3,
        topk, rows, d, inter, float(swiglu_limit), x.stride(0), w1.stride(0), w1.stride(1), h.stride(0),
        0 if s is None else s1.stride(0), 0 if s is None else s1.stride(1),
        BLOCK_M=bm, BLOCK_N=bn_up, BLOCK_K=bk, DOT=dot, FP4=s is not None, DENSE=dense,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    wt = x if dense else weights  # read as it is (any strides and float dtype); DENSE: weight 1, not read
    _expert_down_kernel[(n_tiles, triton.cdiv(d, bn_down))](
        h, order, tile_e, tile_row, tile_end, w2, wt, y, s2, y if add is None else add,
        topk, rows, d, inter, wt.stride(0), wt.stride(1), h.stride(0), w2.stride(0), w2.stride(1), y.stride(0),
        0 if s is None else s2.stride(0), 0 if s is None else s2.stride(1), 0 if add is None else add.stride(0),
        BLOCK_M=bm, BLOCK_N=bn_down, BLOCK_K=bk, DOT=dot, FP4=s is not None, DENSE=dense, ADD=add is not None,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip


def moe_experts(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    swiglu_limit: float,
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    t, d = x.shape
    topk = ids.shape[1]
    e, inter, _ = w1.shape
    s = None
    if scales is not None:  # bytes and exponent bytes; the kernels index them by element
        w1, w3, w2 = (w.view(torch.uint8) for w in (w1, w3, w2))
        s = tuple(sc.contiguous().view(torch.uint8) for sc in scales)
    pairs = t * topk
    if pairs == 0 or e == 0:
        return torch.zeros_like(x) if add is None else add.to(x.dtype, copy=True)
    out = torch.empty_like(x)  # the combine writes every row (0 where a token has no local pair)
    x = x.contiguous()
    tiles = expert_tiles(pairs, e, d, inter)
    schedule = _tile_schedule(ids, e, tiles[0], min(pairs, triton.cdiv(pairs, tiles[0]) + e))
    n_tiles = schedule[1].shape[0]
    if interpreting() and gpu_sms(x.device) is None:  # real tiles first: drop the surplus programs (a read)
        n_tiles = int((schedule[1] >= 0).sum())
    y_pairs = torch.empty(pairs, d, dtype=torch.float32, device=x.device)  # token-major
    w = (w1.contiguous(), w3.contiguous(), w2.contiguous())
    _up_down(x, w, s, swiglu_limit, tiles, n_tiles, pairs, schedule, weights, y_pairs)
    block_t, block_n = (min(pow2(t), 32), min(pow2(d), 512)) if interpreting() else (1, 256)
    _combine_kernel[(triton.cdiv(t, block_t), triton.cdiv(d, block_n))](
        y_pairs,
        ids,
        out if add is None else add,
        out,
        t,
        e,
        topk,
        d,
        y_pairs.stride(0),
        ids.stride(0),
        ids.stride(1),
        0 if add is None else add.stride(0),
        out.stride(0),
        ADD=add is not None,
        BLOCK_T=block_t,
        BLOCK_J=pow2(topk),
        BLOCK_N=block_n,
        num_warps=4,
    )
    return out


def dense_expert(
    x: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    swiglu_limit: float,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    t = x.shape[0]
    if t == 0:
        return torch.zeros_like(x) if add is None else add.to(x.dtype, copy=True)
    out = torch.empty_like(x)
    x = x.contiguous()
    tiles = expert_tiles(t, 1, x.shape[1], w1.shape[0])  # the tiles `moe_experts` takes for it: the same sums
    w = (w1.contiguous()[None], w3.contiguous()[None], w2.contiguous()[None])
    _up_down(x, w, None, swiglu_limit, tiles, triton.cdiv(t, tiles[0]), t, None, None, out, add)
    return out
