"""mHC: the fused split + Sinkhorn-Knopp of the mixes, and the stream mixing around a sub-layer.

`hc_split_sinkhorn`: one program per block of tokens holds each token's (2+n)*n mixes in
registers and writes pre, post and the Sinkhorn-normalised n x n comb in one pass (the n x n
matrices live as a [tokens, n, n] tile; n is padded to a power of two with zeros).
`hc_pre` (x = sum_k pre_k X_k) and `hc_post` (X'_k = post_k f + sum_j comb_jk X_j): one program per
(block of tokens, block of d), all n streams at once; `hc_pre` with the sub-layer's RMSNorm: one
program per token, two passes over d (sum of squares, then scale and gain), x rounded to X's dtype
in between as the two ops would.
`hc_mixes` (the projection of the RMS-normalised flattened streams that feeds the split): one program
per block of tokens, a pass for the sum of squares, then fp32 dots of the normalised rows with fn; on
a GPU, for a few tokens, a first kernel splits the n*d inputs across programs (sums of squares and raw
dots per split) and the second scales their sums (one program walking all 16,384 inputs took 0.62 ms
on an H200). `hc_mixes_sinkhorn`: the same launch then splits its block's mixes (read back after a
barrier) as `hc_split_sinkhorn` does, one launch less per mHC site.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4d.kernels.launch import interpreting, pow2, split_reduction


@triton.jit
def _hc_mixes_kernel(
    x_ptr, fn_ptr, o_ptr, part_ptr, T, K, M, S, sx, sf, so, sp_s, eps,
    scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr, hc_eps,
    PARTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    SINKHORN: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, ITERS: tl.constexpr,
):  # fmt: skip
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_m = tl.arange(0, BLOCK_M)
    t_ok, m_ok = offs_t < T, offs_m < M
    if PARTS:  # sums of squares and raw dots from _hc_mixes_part_kernel's splits, scaled once
        sq = tl.zeros([BLOCK_T], tl.float32)
        acc = tl.zeros([BLOCK_T, BLOCK_M], tl.float32)
        for sp in range(0, S):
            base = part_ptr + sp * sp_s + offs_t * (M + 1)
            sq += tl.load(base, mask=t_ok, other=0.0)
            acc += tl.load(base[:, None] + 1 + offs_m[None, :], mask=t_ok[:, None] & m_ok[None, :], other=0.0)
        acc = acc / tl.sqrt(sq / K + eps)[:, None]
    else:
        sq = tl.zeros([BLOCK_T], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_t[:, None] * sx + k[None, :], mask=t_ok[:, None] & (k < K)[None, :], other=0.0)
            x = x.to(tl.float32)
            sq += tl.sum(x * x, 1)
        inv = 1.0 / tl.sqrt(sq / K + eps)
        acc = tl.zeros([BLOCK_T, BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):  # the normalised rows (as rms_norm stores them) times fn
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_t[:, None] * sx + k[None, :], mask=t_ok[:, None] & (k < K)[None, :], other=0.0)
            x = x.to(tl.float32) * inv[:, None]
            w = tl.load(fn_ptr + offs_m[:, None] * sf + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(w.to(tl.float32)), input_precision="ieee")
    tl.store(o_ptr + offs_t[:, None] * so + offs_m[None, :], acc, mask=t_ok[:, None] & m_ok[None, :])
    if SINKHORN:  # the block's mixes as stored, visible to the whole program after the barrier
        tl.debug_barrier()
        _sinkhorn_rows(o_ptr, so, scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr, offs_t, t_ok, hc_eps, N, NP, ITERS)


@triton.jit
def _hc_mixes_part_kernel(
    x_ptr, fn_ptr, part_ptr, T, K, M, K_SPLIT, sx, sf, sp_s,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (block of tokens, split of the n*d inputs): the split's sum of squares and raw dots
    with fn, to part[split] as [sq, dot_0..dot_M) per token."""
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    sp = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    t_ok, m_ok = offs_t < T, offs_m < M
    k_lo = sp * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    sq = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_M], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_hi
        x = tl.load(x_ptr + offs_t[:, None] * sx + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        x = x.to(tl.float32)
        sq += tl.sum(x * x, 1)
        w = tl.load(fn_ptr + offs_m[:, None] * sf + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w.to(tl.float32)), input_precision="ieee")
    base = part_ptr + sp.to(tl.int64) * sp_s + offs_t * (M + 1)
    tl.store(base, sq, mask=t_ok)
    tl.store(base[:, None] + 1 + offs_m[None, :], acc, mask=t_ok[:, None] & m_ok[None, :])


def hc_mixes(X: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    return _mixes(X, fn, eps, None)[0]


def hc_mixes_sinkhorn(
    X: torch.Tensor,
    fn: torch.Tensor,
    eps: float,
    hc_scale: torch.Tensor,
    hc_base: torch.Tensor,
    n: int,
    iters: int,
    hc_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, pre, post, comb = _mixes(X, fn, eps, (hc_scale, hc_base, n, iters, hc_eps))
    return pre, post, comb


def _split_outputs(t: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.empty(t, *shape, dtype=torch.float32, device=device) for shape in ((n,), (n,), (n, n)))


def _mixes(X: torch.Tensor, fn: torch.Tensor, eps: float, split: tuple | None) -> tuple[torch.Tensor, ...]:
    """The mixes, and with `split` = (hc_scale, hc_base, n, iters, hc_eps) their pre, post and comb
    from the same launch."""
    x = X.reshape(X.shape[0], -1)
    x = x if x.stride(1) == 1 else x.contiguous()
    t, k = x.shape
    m = fn.shape[0]
    fn = fn.contiguous()
    out = torch.empty(t, m, dtype=torch.float32, device=X.device)
    scale, base, n, iters, hc_eps = split if split is not None else (out, out, 1, 1, 0.0)
    pre, post, comb = _split_outputs(t, n, X.device) if split is not None else (out, out, out)
    if t == 0:
        return out, pre, post, comb
    block_m, block_k = pow2(m, 16), min(pow2(k, 16), 1024 if interpreting() else 128)
    per = split_reduction(triton.cdiv(t, 16), k, block_k, X.device)
    splits = triton.cdiv(k, per)
    part = torch.empty(splits, t, m + 1, dtype=torch.float32, device=X.device) if splits > 1 else out
    if splits > 1:
        _hc_mixes_part_kernel[(triton.cdiv(t, 16), splits)](
            x, fn, part, t, k, m, per, x.stride(0), fn.stride(0), part.stride(0),
            BLOCK_T=16, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4,
        )  # fmt: skip
    _hc_mixes_kernel[(triton.cdiv(t, 16),)](
        x, fn, out, part, t, k, m, splits, x.stride(0), fn.stride(0), out.stride(0),
        part.stride(0) if splits > 1 else 0, eps, scale.contiguous(), base.contiguous(), pre, post, comb, hc_eps,
        PARTS=splits > 1, BLOCK_T=16, BLOCK_M=block_m, BLOCK_K=block_k,
        SINKHORN=split is not None, N=n, NP=pow2(n), ITERS=iters, num_warps=4,
    )  # fmt: skip
    return out, pre, post, comb


@triton.jit
def _split_sinkhorn_kernel(
    mix_ptr,
    scale_ptr,
    base_ptr,
    pre_ptr,
    post_ptr,
    comb_ptr,
    T,
    sm,
    eps,
    N: tl.constexpr,
    NP: tl.constexpr,
    ITERS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    _sinkhorn_rows(mix_ptr, sm, scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr, offs_t, offs_t < T, eps, N, NP, ITERS)


@triton.jit
def _sinkhorn_rows(
    mix_ptr, sm, scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr, offs_t, t_ok, eps,
    N: tl.constexpr, NP: tl.constexpr, ITERS: tl.constexpr,
):  # fmt: skip
    """pre, post and comb of the tokens offs_t (t_ok: in range) from their mixes."""
    j = tl.arange(0, NP)
    ok2 = t_ok[:, None] & (j < N)[None, :]
    a_pre = tl.load(scale_ptr).to(tl.float32)
    a_post = tl.load(scale_ptr + 1).to(tl.float32)
    a_res = tl.load(scale_ptr + 2).to(tl.float32)

    m_pre = tl.load(mix_ptr + offs_t[:, None] * sm + j[None, :], mask=ok2, other=0.0).to(tl.float32)
    b_pre = tl.load(base_ptr + j, mask=j < N, other=0.0).to(tl.float32)
    pre = tl.sigmoid(m_pre * a_pre + b_pre[None, :]) + eps
    tl.store(pre_ptr + offs_t[:, None] * N + j[None, :], pre, mask=ok2)
    m_post = tl.load(mix_ptr + offs_t[:, None] * sm + N + j[None, :], mask=ok2, other=0.0).to(tl.float32)
    b_post = tl.load(base_ptr + N + j, mask=j < N, other=0.0).to(tl.float32)
    post = 2.0 * tl.sigmoid(m_post * a_post + b_post[None, :])
    tl.store(post_ptr + offs_t[:, None] * N + j[None, :], post, mask=ok2)

    r = tl.arange(0, NP)[None, :, None]
    c = tl.arange(0, NP)[None, None, :]
    cell = r * N + c  # [1, NP, NP] position in the n x n block
    in_nn = (r < N) & (c < N)
    ok3 = t_ok[:, None, None] & in_nn
    m_res = tl.load(mix_ptr + offs_t[:, None, None] * sm + 2 * N + cell, mask=ok3, other=0.0).to(tl.float32)
    b_res = tl.load(base_ptr + 2 * N + cell, mask=in_nn, other=0.0).to(tl.float32)
    z = tl.where(in_nn, m_res * a_res + b_res, float("-inf"))
    row_max = tl.max(z, 2)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # padded rows
    ez = tl.exp(z - row_max[:, :, None])
    row_sum = tl.sum(ez, 2)
    comb = tl.where(in_nn, ez / tl.maximum(row_sum, 1e-30)[:, :, None] + eps, 0.0)
    comb = comb / (tl.sum(comb, 1)[:, None, :] + eps)
    for _ in range(ITERS - 1):
        comb = comb / (tl.sum(comb, 2)[:, :, None] + eps)
        comb = comb / (tl.sum(comb, 1)[:, None, :] + eps)
    tl.store(comb_ptr + offs_t[:, None, None] * (N * N) + cell, comb, mask=ok3)


def hc_split_sinkhorn(
    mixes: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, n: int, iters: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = mixes.shape[0]
    pre, post, comb = _split_outputs(t, n, mixes.device)
    if t == 0:
        return pre, post, comb
    mixes = mixes.contiguous()
    block_t = min(pow2(t), 256) if interpreting() else 32
    _split_sinkhorn_kernel[(triton.cdiv(t, block_t),)](
        mixes,
        hc_scale.contiguous(),  # upcast as loaded
        hc_base.contiguous(),
        pre,
        post,
        comb,
        t,
        mixes.stride(0),
        eps,
        N=n,
        NP=pow2(n),
        ITERS=iters,
        BLOCK_T=block_t,
        num_warps=4,
    )
    return pre, post, comb


@triton.jit
def _hc_pre_kernel(
    x_ptr, pre_ptr, o_ptr, T, N, Dm, sx_t, sx_n, sp, so, NP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr
):
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    k = tl.arange(0, NP)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t3, k3, d3 = offs_t[:, None, None], k[None, :, None], offs_d[None, None, :]
    X = tl.load(x_ptr + t3 * sx_t + k3 * sx_n + d3, mask=(t3 < T) & (k3 < N) & (d3 < Dm), other=0.0).to(tl.float32)
    w = tl.load(
        pre_ptr + offs_t[:, None] * sp + k[None, :], mask=(offs_t < T)[:, None] & (k < N)[None, :], other=0.0
    ).to(tl.float32)
    out = tl.sum(w[:, :, None] * X, 1)
    tl.store(
        o_ptr + offs_t[:, None] * so + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=(offs_t < T)[:, None] & (offs_d < Dm)[None, :],
    )


@triton.jit
def _hc_post_kernel(
    f_ptr,
    x_ptr,
    post_ptr,
    comb_ptr,
    o_ptr,
    T,
    Dm,
    sf,
    sx_t,
    sx_n,
    sp,
    sc_t,
    so_t,
    so_n,
    N: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    k = tl.arange(0, NP)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok, d_ok = offs_t < T, offs_d < Dm
    tk_ok = t_ok[:, None] & (k < N)[None, :]
    td_ok = t_ok[:, None] & d_ok[None, :]
    f = tl.load(f_ptr + offs_t[:, None] * sf + offs_d[None, :], mask=td_ok, other=0.0).to(tl.float32)
    post = tl.load(post_ptr + offs_t[:, None] * sp + k[None, :], mask=tk_ok, other=0.0).to(tl.float32)
    acc = post[:, :, None] * f[:, None, :]  # [t, k, d]
    for j in tl.static_range(N):
        c_j = tl.load(comb_ptr + offs_t[:, None] * sc_t + j * N + k[None, :], mask=tk_ok, other=0.0)
        x_j = tl.load(x_ptr + offs_t[:, None] * sx_t + j * sx_n + offs_d[None, :], mask=td_ok, other=0.0)
        acc += c_j.to(tl.float32)[:, :, None] * x_j.to(tl.float32)[:, None, :]
    t3, k3, d3 = offs_t[:, None, None], k[None, :, None], offs_d[None, None, :]
    tl.store(o_ptr + t3 * so_t + k3 * so_n + d3, acc.to(o_ptr.dtype.element_ty), mask=(t3 < T) & (k3 < N) & (d3 < Dm))


def _blocks(t: int, d: int) -> tuple[int, int]:
    """(tokens, channels) per program: whole small problems in the interpreter, one token on a GPU."""
    if interpreting():
        return min(pow2(t), 64), min(pow2(d, 16), 1024)
    return 1, min(pow2(d, 16), 512)


@triton.jit
def _hc_pre_norm_kernel(
    x_ptr, pre_ptr, w_ptr, o_ptr, Dm, sx_t, sx_n, sp, so, eps, N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr
):
    t = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, NP)
    w = tl.load(pre_ptr + t * sp + k, mask=k < N, other=0.0).to(tl.float32)
    ty = o_ptr.dtype.element_ty
    sq = tl.zeros([BLOCK_D], tl.float32)
    for d0 in range(0, Dm, BLOCK_D):  # x = sum_k pre_k X_k, rounded as hc_pre stores it; its sum of squares
        d = d0 + tl.arange(0, BLOCK_D)
        X = tl.load(x_ptr + t * sx_t + k[:, None] * sx_n + d[None, :], mask=(k < N)[:, None] & (d < Dm)[None, :])
        x = tl.sum(w[:, None] * X.to(tl.float32), 0).to(ty).to(tl.float32)
        sq += x * x
    inv = 1.0 / tl.sqrt(tl.sum(sq, 0) / Dm + eps)
    for d0 in range(0, Dm, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        X = tl.load(x_ptr + t * sx_t + k[:, None] * sx_n + d[None, :], mask=(k < N)[:, None] & (d < Dm)[None, :])
        x = tl.sum(w[:, None] * X.to(tl.float32), 0).to(ty).to(tl.float32)
        g = tl.load(w_ptr + d, mask=d < Dm, other=0.0).to(tl.float32)
        tl.store(o_ptr + t * so + d, (g * (x * inv)).to(ty), mask=d < Dm)


def hc_pre(X: torch.Tensor, pre: torch.Tensor, norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    t, n, d = X.shape
    X, pre = X.contiguous(), pre.contiguous()
    out = torch.empty(t, d, dtype=X.dtype, device=X.device)
    if t == 0 or d == 0:
        return out
    if norm is not None:  # one program per token: the norm needs the whole row
        weight, eps = norm
        _hc_pre_norm_kernel[(t,)](
            X,
            pre,
            weight,
            out,
            d,
            X.stride(0),
            X.stride(1),
            pre.stride(0),
            out.stride(0),
            eps,
            N=n,
            NP=pow2(n),
            BLOCK_D=min(pow2(d, 16), 1024),
            num_warps=4,
        )
        return out
    bt, bd = _blocks(t, d)
    _hc_pre_kernel[(triton.cdiv(t, bt), triton.cdiv(d, bd))](
        X,
        pre,
        out,
        t,
        n,
        d,
        X.stride(0),
        X.stride(1),
        pre.stride(0),
        out.stride(0),
        NP=pow2(n),
        BLOCK_T=bt,
        BLOCK_D=bd,
        num_warps=4,
    )
    return out


def hc_post(f: torch.Tensor, X: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    t, n, d = X.shape
    f, X, post, comb = f.contiguous(), X.contiguous(), post.contiguous(), comb.contiguous()
    out = torch.empty_like(X)
    if t == 0 or d == 0:
        return out
    bt, bd = _blocks(t, d)
    _hc_post_kernel[(triton.cdiv(t, bt), triton.cdiv(d, bd))](
        f,
        X,
        post,
        comb,
        out,
        t,
        d,
        f.stride(0),
        X.stride(0),
        X.stride(1),
        post.stride(0),
        comb.stride(0),
        out.stride(0),
        out.stride(1),
        N=n,
        NP=pow2(n),
        BLOCK_T=bt,
        BLOCK_D=bd,
        num_warps=4,
    )
    return out
