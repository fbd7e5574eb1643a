"""Hybrid attention of one layer (docs/deepseek-v4.md §2.1): SWA-only, CSA or HCA by `compress_ratios`.

Shared-KV MQA: one 512-d entry per cached position is both key and value. Queries come from a
low-rank latent (also the indexer's), get a per-head RMS norm without gain and RoPE. Each query
attends, in one softmax with a per-head sink, to the window (its last `sliding_window` positions,
itself included) and to compressed entries of closed blocks: all of them on HCA layers, the
indexer's top-k on CSA layers. The output is rotated back by -t (only relative position remains)
and projected per group of heads, then to the model width.

Everything runs once over all rows of the step (serving/model/step.py): ring and page reads go
through index tensors into the cache, in its storage format, with no per-sequence loop and no copy
of compressed entries (one `paged_sparse_attention` call per layer).
"""

from __future__ import annotations

import torch
from torch import nn

from v4d.kernels import ops
from v4d.serving.config import ModelConfig
from v4d.serving.model.cache import LayerCache
from v4d.serving.model.compressor import Compressor
from v4d.serving.model.indexer import Indexer
from v4d.serving.model.linear import Linear
from v4d.serving.model.norm import RMSNorm, rms_normalize
from v4d.serving.model.rope import Rope
from v4d.serving.model.step import Step


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.ratio = layer, cfg.compress_ratios[layer]
        self.n_heads, self.head_dim, self.groups = cfg.num_attention_heads, cfg.head_dim, cfg.o_groups
        self.o_lora_rank, self.window, self.eps = cfg.o_lora_rank, cfg.sliding_window, cfg.rms_norm_eps
        d, h, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.attn_sink = nn.Parameter(torch.zeros(h, dtype=torch.float32))
        self.wq_a = Linear(d, cfg.q_lora_rank, "fp8")
        self.q_norm = RMSNorm(cfg.q_lora_rank, self.eps)
        self.wq_b = Linear(cfg.q_lora_rank, h * hd, "fp8")
        self.wkv = Linear(d, hd, "fp8")
        self.kv_norm = RMSNorm(hd, self.eps)
        self.wo_a = Linear(h * hd // self.groups, self.groups * cfg.o_lora_rank, "fp8")
        self.wo_b = Linear(self.groups * cfg.o_lora_rank, d, "fp8")
        self.rope = Rope.for_layer(cfg, layer)
        self.scale = hd**-0.5
        self.compressor = Compressor(d, self.ratio, hd, self.rope, self.eps) if self.ratio else None
        self.indexer = Indexer(cfg, self.ratio, self.rope) if self.ratio == 4 else None

    def forward(self, x: torch.Tensor, step: Step, cache: LayerCache) -> torch.Tensor:
        """x: [N, d] (already normalised) rows of the step. Writes the step's state; returns [N, d]."""
        pos, rd = step.pos, self.rope.dim
        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))
        q = self.rope(rms_normalize(q, self.eps, x.dtype), pos)
        # Pack window entries in the storage format once: this step reads them unpacked and the ring
        # gets the same bytes, so a position reads the same value from this step's rows or the ring.
        packed = ops.store_rows(self.rope(self.kv_norm(self.wkv(x)), pos), cache.window, rd)
        packed_rows = packed.dtype == torch.uint8
        kv = ops.unpack_main(packed, self.head_dim, rd, x.dtype) if packed_rows else packed.to(x.dtype)
        ring = cache.window.flatten(0, 1)
        idx, store = step.window_idx, None
        if self.compressor is not None:
            comp = step.compression(self.ratio)
            store = cache.main.flatten(0, 1)
            entries = self.compressor.update(*self.compressor.project(x), pos, comp, cache.comp, x.dtype)
            store[comp.entry_rows] = ops.store_rows(entries, store, rd)
            if self.indexer is not None:
                rows = self.indexer.select(self.indexer.project(x, qr, pos), step, comp, cache)
            else:  # HCA: every closed block, visible once p >= ratio * (s + 1) - 1
                rows = comp.all_visible_rows(step)
            idx = torch.cat([idx, torch.where(rows >= 0, rows + step.n_rows + ring.shape[0], -1)], dim=1)
        o = ops.paged_sparse_attention(q, kv, ring, store, idx, self.attn_sink, self.scale, rd)
        ring[step.ring_dst] = packed[step.ring_src]
        o = self.rope(o, pos, inverse=True).view(x.shape[0], self.groups, -1)
        o = self.wo_a.grouped(o, self.groups)
        return self.wo_b(o.flatten(1))
