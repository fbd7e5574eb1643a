"""mHC: the 4-stream residual around every sub-layer, and the reduction-only head (docs/deepseek-v4.md §4).

The parameters live on the owning module under the official names (`hc_attn_fn`, `hc_ffn_base`,
`hc_head_scale`, ...); these functions hold the math. Mixing runs in fp32.
"""

from __future__ import annotations

import torch

from v4d.kernels import ops
from v4d.serving.model.norm import RMSNorm


def hc_pre(
    X: torch.Tensor,
    fn: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    iters: int,
    norm_eps: float,
    hc_eps: float,
    norm: RMSNorm,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """X: [T, n, d] streams -> (sub-layer input [T, d] after the sub-layer's `norm`, post [T, n],
    comb [T, n, n]). Two launches: mixes with split + Sinkhorn, weighted sum + norm."""
    pre, post, comb = ops.hc_mixes_sinkhorn(X, fn, norm_eps, scale, base, X.shape[1], iters, hc_eps)
    return ops.hc_pre(X, pre, (norm.weight, norm.eps)), post, comb  # fp32 math inside, X's dtype out


def hc_post(f: torch.Tensor, X: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """X'_k = post_k f + sum_j comb[j, k] X_j."""
    return ops.hc_post(f, X, post, comb)


def hc_head(
    X: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm_eps: float, hc_eps: float
) -> torch.Tensor:
    """Reduction-only mHC before the final norm: sigmoid weights, no Sinkhorn. [T, n, d] -> [T, d]."""
    pre = torch.sigmoid(ops.hc_mixes(X, fn, norm_eps) * scale + base) + hc_eps
    return ops.hc_pre(X, pre)
