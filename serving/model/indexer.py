"""Lightning indexer of CSA layers (docs/deepseek-v4.md §2.1 step 4): picks the top-k compressed entries.

Score I[t, s] = sum_h w[t, h] * relu(q_I[t, h] . K_I[s]) over the indexer keys of closed blocks
(4s + 3 <= t). The keys come from the indexer's own overlapped compressor (width index_head_dim).
The released model applies a Hadamard rotation and FP4 rounding to q_I and K_I. With the deployed
KV format the keys are stored that way (kernels/kv_format.py) and the queries get the same
rotation; the rotation is orthogonal, so in the plain formats it would change no score and is
left out.
"""

from __future__ import annotations

import torch
from torch import nn

from v4d.kernels import ops
from v4d.serving.config import ModelConfig
from v4d.serving.model.cache import LayerCache
from v4d.serving.model.compressor import Compressor
from v4d.serving.model.linear import Linear
from v4d.serving.model.rope import Rope
from v4d.serving.model.step import Compression, Step


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig, ratio: int, rope: Rope):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, "fp8")
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)
        self.compressor = Compressor(cfg.hidden_size, ratio, self.head_dim, rope, cfg.rms_norm_eps)
        self.rope = rope
        self.scale = (self.head_dim * self.n_heads) ** -0.5

    def select(
        self, q: torch.Tensor, w: torch.Tensor, proj: torch.Tensor, step: Step, comp: Compression, cache: LayerCache
    ) -> torch.Tensor:
        """Advance the indexer keys of the step and return each row's attention indices: the window's,
        then its top-k entries' page-store rows past the step's rows and rings ([N, W + k], -1 = none).
        q = wq_b(qr), w = weights_proj(x), proj: the compressor's projections (all from the
        attention's joined GEMMs)."""
        keys, norm = self.compressor.update(proj, comp, cache.index_comp, q.dtype)
        store = ops.store_rows(keys, cache.index.flatten(0, 1), None, comp.entry_rows, norm)
        # the queries roped, and in the deployed format (FP4 keys in the Hadamard basis) rotated like
        # the keys, in one launch
        q = self.rope(q.unflatten(-1, (self.n_heads, self.head_dim)), step.pos, hadamard=store.dtype == torch.uint8)
        # only the pages that hold a visible entry: the scan and top-k cover closed blocks, not the table
        table = step.block_table[:, : max(1, -(-comp.max_visible // comp.per_page))]
        scores = ops.paged_indexer_scores(q, w, cache.index, table, step.seq, comp.visible, self.scale)
        rows = (table, step.seq, comp.per_page, step.entry_offset)
        return ops.indexer_topk(scores, min(self.topk, comp.max_visible), rows, step.window_idx)
