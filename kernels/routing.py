"""The MoE router in one launch: logits x W^T (fp32), s = sqrt(softplus(logits)), the top-k of s + bias
(or a hash layer's table row of the token), weights = chosen s normalised to sum 1, times the scale.

One program per block of tokens holds every expert's logit ([tokens, experts] fp32 tile from a K-loop
of fp32 dots; on a GPU, for a few tokens, the loop over d is split across programs by a first kernel
and the partial logits summed here, since one program streaming all of W took 0.43 ms on an H200),
then picks the k experts one at a time (largest first, lowest index on ties) and keeps
ids and weights as [tokens, k] tiles. softplus is log1p(exp(z)) with log1p(u) = log(1 + u) * u / ((1 + u) - 1)
(exact to rounding for small u), z past 20 as is, like torch's threshold.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4d.kernels.launch import pow2, split_reduction


@triton.jit
def _logits(
    x_ptr,
    w_ptr,
    t,
    t_ok,
    e,
    e_ok,
    d_lo,
    d_hi,
    sx,
    sw,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """[BLOCK_T, BLOCK_E] fp32 dots of x rows t and W rows e over d in [d_lo, d_hi)."""
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < d_hi
        xs = tl.load(x_ptr + t[:, None] * sx + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        ws = tl.load(w_ptr + e[:, None] * sw + d[None, :], mask=e_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.dot(xs.to(tl.float32), tl.trans(ws.to(tl.float32)), input_precision="ieee")
    return acc


@triton.jit
def _moe_logits_kernel(
    x_ptr, w_ptr, part_ptr, T, D, E, D_SPLIT, sx, sw, sp_s,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (block of tokens, split of d): the split's partial logits, to part[split]."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    sp = tl.program_id(1)
    t_ok = t < T
    e = tl.arange(0, BLOCK_E)
    e_ok = e < E
    d_lo = sp * D_SPLIT
    acc = _logits(
        x_ptr, w_ptr, t, t_ok, e, e_ok, d_lo, tl.minimum(d_lo + D_SPLIT, D), sx, sw, BLOCK_T, BLOCK_E, BLOCK_D
    )
    tl.store(part_ptr + sp.to(tl.int64) * sp_s + t[:, None] * E + e[None, :], acc, mask=t_ok[:, None] & e_ok[None, :])


@triton.jit
def _moe_route_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    tid_ptr,
    tok_ptr,
    wout_ptr,
    iout_ptr,
    T,
    D,
    E,
    K,
    sx,
    sw,
    st,
    scale,
    part_ptr,
    S,
    sp_s,
    HASH: tl.constexpr,
    PARTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    e = tl.arange(0, BLOCK_E)
    e_ok = e < E
    if PARTS:  # logits summed from _moe_logits_kernel's splits of d
        acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        for sp in range(0, S):
            acc += tl.load(
                part_ptr + sp * sp_s + t[:, None] * E + e[None, :], mask=t_ok[:, None] & e_ok[None, :], other=0.0
            )
    else:
        acc = _logits(x_ptr, w_ptr, t, t_ok, e, e_ok, 0, D, sx, sw, BLOCK_T, BLOCK_E, BLOCK_D)
    u = tl.exp(tl.minimum(acc, 20.0))
    w1 = 1.0 + u
    log1p = tl.where(w1 == 1.0, u, tl.log(w1) * u / tl.where(w1 == 1.0, 1.0, w1 - 1.0))
    s = tl.sqrt(tl.where(acc > 20.0, acc, log1p))
    if HASH:
        tok = tl.load(tok_ptr + t, mask=t_ok, other=0).to(tl.int64)
    else:
        pick = tl.where(e_ok[None, :], s + tl.load(bias_ptr + e, mask=e_ok, other=0.0)[None, :], float("-inf"))
    kc = tl.arange(0, BLOCK_K)[None, :]
    ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int64)
    wts = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for j in range(K):
        if HASH:
            sel = tl.load(tid_ptr + tok * st + j, mask=t_ok, other=0).to(tl.int64)
        else:
            best = tl.max(pick, 1)
            sel = tl.min(tl.where(pick == best[:, None], e[None, :], BLOCK_E), 1).to(tl.int64)
            pick = tl.where(e[None, :] == sel[:, None], float("-inf"), pick)
        chosen = tl.sum(tl.where(e[None, :] == sel[:, None], s, 0.0), 1)
        ids = tl.where(kc == j, sel[:, None], ids)
        wts = tl.where(kc == j, chosen[:, None], wts)
    wts = wts / tl.sum(wts, 1)[:, None] * scale
    ok = t_ok[:, None] & (kc < K)
    tl.store(wout_ptr + t[:, None] * K + kc, wts, mask=ok)
    tl.store(iout_ptr + t[:, None] * K + kc, ids, mask=ok)


def moe_route(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    scale: float,
    tid2eid: torch.Tensor | None,
    input_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    t, d = x.shape
    e = weight.shape[0]
    weights = torch.empty(t, k, dtype=torch.float32, device=x.device)
    ids = torch.empty(t, k, dtype=torch.int64, device=x.device)
    if t == 0 or k == 0:
        return weights, ids
    x, weight = x.contiguous(), weight.contiguous()
    hashed = tid2eid is not None
    table = tid2eid.contiguous() if hashed else weights
    block_e, block_d = pow2(e, 16), min(pow2(d, 16), 64)
    per = split_reduction(triton.cdiv(t, 16), d, block_d, x.device)
    splits = triton.cdiv(d, per)
    part = torch.empty(splits, t, e, dtype=torch.float32, device=x.device) if splits > 1 else weights
    if splits > 1:
        _moe_logits_kernel[(triton.cdiv(t, 16), splits)](
            x, weight, part, t, d, e, per, x.stride(0), weight.stride(0), part.stride(0),
            BLOCK_T=16, BLOCK_E=block_e, BLOCK_D=block_d,
        )  # fmt: skip
    _moe_route_kernel[(triton.cdiv(t, 16),)](
        x,
        weight,
        weights if bias is None else bias,
        table,
        input_ids if hashed else ids,
        weights,
        ids,
        t,
        d,
        e,
        k,
        x.stride(0),
        weight.stride(0),
        table.stride(0),
        float(scale),
        part,
        splits,
        part.stride(0) if splits > 1 else 0,
        HASH=hashed,
        PARTS=splits > 1,
        BLOCK_T=16,
        BLOCK_E=block_e,
        BLOCK_D=block_d,
        BLOCK_K=pow2(k),
    )
    return weights, ids
