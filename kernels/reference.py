"""Plain torch references for every op in `v4d.kernels.ops`: these define the semantics.

All math is done in fp32; results are cast back to the input's dtype (indexer scores and the mHC
split stay fp32). Shapes follow docs/contracts.md ("Kernels"). Written for readability, not speed:
they run the model on CPU and on accelerators without a Triton backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from v4d.kernels.quant import act_quant as quantise_activations
from v4d.kernels.quant import dequant_fp4, dequant_fp8


def sparse_attention(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float
) -> torch.Tensor:
    """o[t,h] = sum_j p[t,h,j] kv[idx[t,j]], p = exp(z) / (sum exp(z) + exp(sink[h])).

    z[t,h,j] = scale * q[t,h] . kv[idx[t,j]]; entries with idx == -1 are left out. Keys are the
    values (shared K=V). A row whose indices are all -1 returns zeros.
    """
    qf, kvf = q.float(), kv.float()
    valid = idx >= 0                                              # [T,K]
    rows = kvf[idx.clamp(min=0).long()]                           # [T,K,D]
    z = torch.einsum("thd,tkd->thk", qf, rows) * scale
    z = z.masked_fill(~valid[:, None, :], float("-inf"))
    sink_z = sink.float()[None, :, None].expand(z.shape[0], -1, 1)
    # The sink is one more logit in the softmax whose value is dropped afterwards.
    p = torch.softmax(torch.cat([z, sink_z], dim=-1), dim=-1)[..., :-1]
    o = torch.einsum("thk,tkd->thd", p, rows)
    return o.to(q.dtype)


def indexer_scores(
    q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, n_visible: torch.Tensor
) -> torch.Tensor:
    """scores[t,s] = sum_h w[t,h] * relu(q[t,h] . k[s]), -inf where s >= n_visible[t] (fp32)."""
    s = torch.relu(torch.einsum("thd,sd->ths", q.float(), k.float()))
    scores = torch.einsum("ths,th->ts", s, w.float())
    hidden = torch.arange(k.shape[0], device=k.device)[None, :] >= n_visible.to(k.device)[:, None]
    return scores.masked_fill(hidden, float("-inf"))


def indexer_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest finite scores per row (int32), -1 in the slots left over.

    Ties at the k-th score go to the lowest index (a stable sort, not `topk`, whose tie order is
    unspecified), so the choice does not depend on the masked columns after it. Order: descending
    score here; callers treat the selection as a set (the Triton kernel returns ascending indices).
    """
    t, s = scores.shape
    idx = torch.full((t, k), -1, dtype=torch.int32, device=scores.device)
    kk = min(k, s)
    if kk == 0:
        return idx
    vals, order = torch.sort(scores.float(), dim=-1, descending=True, stable=True)
    idx[:, :kk] = torch.where(torch.isfinite(vals[:, :kk]), order[:, :kk], -1).to(torch.int32)
    return idx


def gated_pool(values: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """out[b,c] = sum_l softmax_l(gates[b,:,c]) * values[b,l,c].

    A gate of -inf is a padded slot (weight 0); a channel whose gates are all -inf pools to 0.
    """
    g = gates.float()
    m = g.amax(dim=1, keepdim=True)
    e = torch.exp(g - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    den = e.sum(dim=1)
    num = (e * values.float()).sum(dim=1)
    out = torch.where(den > 0, num / den.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(num))
    return out.to(values.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(min(gate, limit)) * clamp(up, -limit, limit); limit <= 0 disables the clamp."""
    if limit > 0:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return F.silu(gate) * up


def moe_experts(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    swiglu_limit: float,
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """y[t] = sum_j weights[t,j] * w2[e] @ swiglu(w1[e] x[t], w3[e] x[t]), e = ids[t,j].

    Only ids in [0, E) count (E = local experts); -1 means "routed elsewhere". With `scales`
    (s1, s3, s2) the weights are packed MXFP4 (int8 [E, out, in/2]) and each used expert is decoded.
    """
    xf = x.float()
    y = torch.zeros_like(xf)

    def weight(w: torch.Tensor, i: int, e: int) -> torch.Tensor:
        return w[e].float() if scales is None else dequant_fp4(w[e], scales[i][e])

    for e in torch.unique(ids).tolist():
        if not 0 <= e < w1.shape[0]:
            continue
        tok, slot = torch.where(ids == e)
        xe = xf[tok]
        h = swiglu(xe @ weight(w1, 0, e).T, xe @ weight(w3, 1, e).T, swiglu_limit)
        y.index_add_(0, tok, (h @ weight(w2, 2, e).T) * weights[tok, slot].float()[:, None])
    return y.to(x.dtype)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, act_quant: bool = True) -> torch.Tensor:
    """y[T,N] = act_quant(x) @ (w * scale)^T in fp32, cast to x's dtype.

    w is float8_e4m3fn [N, K] with UE8M0 scales per 128x128 block; x is quantised to FP8 per token
    and 128 channels (UE8M0 scales) first, as the FP8 GEMM on tensor cores sees it
    (`act_quant=False`: weight-only, x as given).
    """
    if not act_quant:
        return (x.float() @ dequant_fp8(w, scale).T).to(x.dtype)
    xq, xs = quantise_activations(x)
    xd = xq.float() * xs.repeat_interleave(128, 1)[:, : x.shape[1]]
    return (xd @ dequant_fp8(w, scale).T).to(x.dtype)


def hc_split_sinkhorn(
    mixes: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, n: int, iters: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the (2+n)*n mHC mixes into pre [T,n], post [T,n] and comb [T,n,n] (all fp32).

    pre = sigmoid(a0*m[:n] + b) + eps; post = 2*sigmoid(a1*m[n:2n] + b); comb = Sinkhorn-Knopp of
    a2*m[2n:] + b reshaped n x n: row softmax + eps, column-normalise, then iters-1 rounds of
    (row-normalise, column-normalise), each dividing by (sum + eps) (deepseek-v4.md §4).
    """
    m, base, scale = mixes.float(), hc_base.float(), hc_scale.float()
    pre = torch.sigmoid(m[:, :n] * scale[0] + base[:n]) + eps
    post = 2 * torch.sigmoid(m[:, n : 2 * n] * scale[1] + base[n : 2 * n])
    comb = (m[:, 2 * n :] * scale[2] + base[2 * n :]).view(-1, n, n)
    comb = torch.softmax(comb, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return pre, post, comb


def hc_pre(X: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """x[t] = sum_k pre[t,k] X[t,k]: the sub-layer input from the n residual streams."""
    return torch.einsum("tk,tkd->td", pre.float(), X.float()).to(X.dtype)


def hc_post(f: torch.Tensor, X: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """X'[t,k] = post[t,k] f[t] + sum_j comb[t,j,k] X[t,j]: the new residual streams (X's dtype)."""
    mixed = torch.einsum("tjk,tjd->tkd", comb.float(), X.float())
    return (post.float()[:, :, None] * f.float()[:, None, :] + mixed).to(X.dtype)
