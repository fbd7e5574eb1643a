"""Lightning indexer of CSA layers (deepseek-v4.md §2.1 step 4): picks the top-k compressed entries.

Score I[t, s] = sum_h w[t, h] * relu(q_I[t, h] . K_I[s]) over the indexer keys of closed blocks
(4s + 3 <= t). The keys come from the indexer's own overlapped compressor (width index_head_dim).
The released model applies a Hadamard rotation and FP4 rounding to q_I and K_I; the rotation is
orthogonal, so without the rounding it leaves every score unchanged and is omitted here.
"""

from __future__ import annotations

import torch
from torch import nn

from v4d.kernels import ops
from v4d.serving.config import ModelConfig
from v4d.serving.model.cache import LayerCache, read_entries, write_entries
from v4d.serving.model.compressor import Compressor
from v4d.serving.model.linear import Linear
from v4d.serving.model.rope import Rope


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig, ratio: int, rope: Rope):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, "fp8")
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)
        self.compressor = Compressor(cfg.hidden_size, ratio, self.head_dim, rope, cfg.rms_norm_eps)
        self.rope = rope
        self.scale = (self.head_dim * self.n_heads) ** -0.5

    def project(self, x: torch.Tensor, qr: torch.Tensor, pos: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token inputs of the whole batch: queries (roped), head weights, compressor inputs."""
        q = self.rope(self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim)), pos)
        kv, score = self.compressor.project(x)
        return {"q": q, "w": self.weights_proj(x) * self.scale, "kv": kv, "score": score}

    def select(self, p: dict[str, torch.Tensor], rows: slice, start: int, slot: int, page_ids: list[int],
               cache: LayerCache) -> torch.Tensor:
        """Advance the indexer keys of one sequence and return its top-k entry ids [T, k] (-1 = none)."""
        keys, first = self.compressor.step(p["kv"][rows], p["score"][rows], start, cache.index_comp, slot,
                                           p["q"].dtype)
        if keys.shape[0]:
            write_entries(cache.index, page_ids, first, keys)
        q = p["q"][rows]
        n_closed = (start + q.shape[0]) // self.compressor.ratio
        if n_closed == 0:
            return torch.empty(q.shape[0], 0, dtype=torch.int32, device=q.device)
        visible = (torch.arange(start, start + q.shape[0], device=q.device) + 1) // self.compressor.ratio
        keys = read_entries(cache.index, page_ids, n_closed).to(q.dtype)
        scores = ops.indexer_scores(q, p["w"][rows], keys, visible)
        return ops.indexer_topk(scores, min(self.topk, n_closed))
