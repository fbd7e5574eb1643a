"""MTP block (docs/deepseek-v4.md §6): predicts token t+2 from the main model's streams at t and token t+1.

A full block (SWA-only attention, non-hash MoE) fed with e_proj(enorm(embed(next))) broadcast to
the streams plus h_proj(hnorm(streams)); it has its own head-mHC and final norm, and shares the
embedding and LM head with the main model (they are passed in, so the state dict holds them once).
"""

from __future__ import annotations

import torch
from torch import nn

from v4d.serving.config import ModelConfig
from v4d.serving.model.block import Block
from v4d.serving.model.cache import KVCache
from v4d.serving.model.linear import Linear
from v4d.serving.model.moe import ExpertBackend
from v4d.serving.model.norm import RMSNorm
from v4d.serving.model.step import Step


class MTPBlock(Block):
    def __init__(self, cfg: ModelConfig, layer: int, with_experts: bool = True):
        super().__init__(cfg, layer, with_experts)
        d, n = cfg.hidden_size, cfg.hc_mult
        self.e_proj = Linear(d, d, "fp8")
        self.h_proj = Linear(d, d, "fp8")
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.hc_head_fn = nn.Parameter(torch.zeros(n, n * d, dtype=torch.float32))
        self.hc_head_base = nn.Parameter(torch.zeros(n, dtype=torch.float32))
        self.hc_head_scale = nn.Parameter(torch.zeros(1, dtype=torch.float32))

    def forward(
        self,
        X: torch.Tensor,
        next_ids: torch.Tensor,
        step: Step,
        kv: KVCache,
        experts: ExpertBackend,
        embed: nn.Embedding,
    ) -> torch.Tensor:
        e = self.e_proj(self.enorm(embed(next_ids)))
        X = e.unsqueeze(1) + self.h_proj(self.hnorm(X))
        return super().forward(X, next_ids, step, kv, experts)
