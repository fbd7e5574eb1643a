"""One transformer block: attention and MoE, each wrapped in an mHC site (docs/deepseek-v4.md §4)."""

from __future__ import annotations

import torch
from torch import nn

from v4d.serving.config import ModelConfig
from v4d.serving.model.attention import Attention
from v4d.serving.model.cache import KVCache
from v4d.serving.model.mhc import hc_post, hc_pre
from v4d.serving.model.moe import ExpertBackend, MoE
from v4d.serving.model.norm import RMSNorm
from v4d.serving.model.step import Step


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, with_experts: bool = True):
        super().__init__()
        self.layer = layer
        self.iters, self.norm_eps, self.hc_eps = cfg.hc_sinkhorn_iters, cfg.rms_norm_eps, cfg.hc_eps
        self.attn = Attention(cfg, layer)
        self.ffn = MoE(cfg, layer, with_experts)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        n = cfg.hc_mult
        mix, width = (2 + n) * n, n * cfg.hidden_size
        for site in ("attn", "ffn"):
            setattr(self, f"hc_{site}_fn", nn.Parameter(torch.zeros(mix, width, dtype=torch.float32)))
            setattr(self, f"hc_{site}_base", nn.Parameter(torch.zeros(mix, dtype=torch.float32)))
            setattr(self, f"hc_{site}_scale", nn.Parameter(torch.zeros(3, dtype=torch.float32)))

    def _site(self, name: str, X: torch.Tensor):
        """The sub-layer's input (mHC pre-mix, then its norm), post and comb."""
        fn, base, scale = (getattr(self, f"hc_{name}_{p}") for p in ("fn", "base", "scale"))
        norm = getattr(self, f"{name}_norm")
        return hc_pre(X, fn, scale, base, self.iters, self.norm_eps, self.hc_eps, norm)

    def forward(
        self, X: torch.Tensor, input_ids: torch.Tensor, step: Step, kv: KVCache, experts: ExpertBackend
    ) -> torch.Tensor:
        """X: [N, hc_mult, d] residual streams of every token in the batch."""
        x, post, comb = self._site("attn", X)
        X = hc_post(self.attn(x, step, kv.layer(self.layer)), X, post, comb)
        x, post, comb = self._site("ffn", X)
        return hc_post(self.ffn(x, input_ids, experts), X, post, comb)
