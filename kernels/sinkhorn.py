"""mHC: the fused split + Sinkhorn-Knopp of the mixes, and the stream mixing around a sub-layer.

`hc_split_sinkhorn`: one program per block of tokens holds each token's (2+n)*n mixes in
registers and writes pre, post and the Sinkhorn-normalised n x n comb in one pass (the n x n
matrices live as a [tokens, n, n] tile; n is padded to a power of two with zeros).
`hc_pre` (x = sum_k pre_k X_k) and `hc_post` (X'_k = post_k f + sum_j comb_jk X_j): one program per
(token, block of d), all n streams at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from v4d.kernels.launch import interpreting, pow2


@triton.jit
def _split_sinkhorn_kernel(
    mix_ptr, scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr,
    T, sm, eps,
    N: tl.constexpr, NP: tl.constexpr, ITERS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
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
    cell = r * N + c                                      # [1, NP, NP] position in the n x n block
    in_nn = (r < N) & (c < N)
    ok3 = t_ok[:, None, None] & in_nn
    m_res = tl.load(mix_ptr + offs_t[:, None, None] * sm + 2 * N + cell, mask=ok3, other=0.0).to(tl.float32)
    b_res = tl.load(base_ptr + 2 * N + cell, mask=in_nn, other=0.0).to(tl.float32)
    z = tl.where(in_nn, m_res * a_res + b_res, float("-inf"))
    row_max = tl.max(z, 2)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)    # padded rows
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
    dev = mixes.device
    pre = torch.empty(t, n, dtype=torch.float32, device=dev)
    post = torch.empty(t, n, dtype=torch.float32, device=dev)
    comb = torch.empty(t, n, n, dtype=torch.float32, device=dev)
    if t == 0:
        return pre, post, comb
    mixes = mixes.contiguous()
    block_t = min(pow2(t), 256) if interpreting() else 32
    _split_sinkhorn_kernel[(triton.cdiv(t, block_t),)](
        mixes, hc_scale.float().contiguous(), hc_base.float().contiguous(), pre, post, comb,
        t, mixes.stride(0), eps,
        N=n, NP=pow2(n), ITERS=iters, BLOCK_T=block_t, num_warps=4,
    )
    return pre, post, comb


@triton.jit
def _hc_pre_kernel(x_ptr, pre_ptr, o_ptr, N, Dm, sx_t, sx_n, sp, so,
                   NP: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    k = tl.arange(0, NP)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    X = tl.load(x_ptr + t * sx_t + k[:, None] * sx_n + offs_d[None, :],
                mask=(k < N)[:, None] & (offs_d < Dm)[None, :], other=0.0).to(tl.float32)
    w = tl.load(pre_ptr + t * sp + k, mask=k < N, other=0.0).to(tl.float32)
    tl.store(o_ptr + t * so + offs_d, tl.sum(w[:, None] * X, 0).to(o_ptr.dtype.element_ty), mask=offs_d < Dm)


@triton.jit
def _hc_post_kernel(f_ptr, x_ptr, post_ptr, comb_ptr, o_ptr, N, Dm, sf, sx_t, sx_n, sp, sc_t, so_t, so_n,
                    NP: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    k = tl.arange(0, NP)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = (k < N)[:, None] & (offs_d < Dm)[None, :]
    X = tl.load(x_ptr + t * sx_t + k[:, None] * sx_n + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    f = tl.load(f_ptr + t * sf + offs_d, mask=offs_d < Dm, other=0.0).to(tl.float32)
    post = tl.load(post_ptr + t * sp + k, mask=k < N, other=0.0).to(tl.float32)
    comb = tl.load(comb_ptr + t * sc_t + k[:, None] * N + k[None, :],          # [j, k]
                   mask=(k < N)[:, None] & (k < N)[None, :], other=0.0).to(tl.float32)
    mixed = tl.sum(comb[:, :, None] * X[:, None, :], 0)                        # [k, d]
    out = post[:, None] * f[None, :] + mixed
    tl.store(o_ptr + t * so_t + k[:, None] * so_n + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=ok)


def _block_d(d: int) -> int:
    return min(pow2(d, 16), 4096 if interpreting() else 512)


def hc_pre(X: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    t, n, d = X.shape
    X, pre = X.contiguous(), pre.contiguous()
    out = torch.empty(t, d, dtype=X.dtype, device=X.device)
    if t == 0 or d == 0:
        return out
    block_d = _block_d(d)
    _hc_pre_kernel[(t, triton.cdiv(d, block_d))](
        X, pre, out, n, d, X.stride(0), X.stride(1), pre.stride(0), out.stride(0),
        NP=pow2(n), BLOCK_D=block_d, num_warps=4,
    )
    return out


def hc_post(f: torch.Tensor, X: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    t, n, d = X.shape
    f, X, post, comb = f.contiguous(), X.contiguous(), post.contiguous(), comb.contiguous()
    out = torch.empty_like(X)
    if t == 0 or d == 0:
        return out
    block_d = _block_d(d)
    _hc_post_kernel[(t, triton.cdiv(d, block_d))](
        f, X, post, comb, out, n, d, f.stride(0), X.stride(0), X.stride(1), post.stride(0), comb.stride(0),
        out.stride(0), out.stride(1),
        NP=pow2(n), BLOCK_D=block_d, num_warps=4,
    )
    return out
