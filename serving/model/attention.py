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
from v4d.serving.model.concat import RowConcat
from v4d.serving.model.indexer import Indexer
from v4d.serving.model.linear import Linear, linear_fp32
from v4d.serving.model.norm import RMSNorm
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
        # the compressors' value and gate projections (main, then the indexer's): one fp32 GEMM
        comps = [self.compressor, *([self.indexer.compressor] if self.indexer else [])] if self.compressor else []
        self.comp_proj = RowConcat(*(lin for c in comps for lin in (c.wkv, c.wgate))) if comps else None
        # the projections of x (query latent, window entry, indexer head weights) and of the query
        # latent (queries, indexer queries), each one GEMM where their formats allow
        ix = [self.indexer] if self.indexer else []
        self.x_proj = RowConcat(self.wq_a, self.wkv, *(i.weights_proj for i in ix))
        self.qr_proj = RowConcat(self.wq_b, *(i.wq_b for i in ix))

    def forward(self, x: torch.Tensor, step: Step, cache: LayerCache) -> torch.Tensor:
        """x: [N, d] (already normalised) rows of the step. Writes the step's state; returns [N, d]."""
        rd, rotary = self.rope.dim, (step.pos, self.rope.inv_freq)
        qa, kv_a, *iw = self.x_proj(x)
        qr = self.q_norm(qa)
        q, *iq = self.qr_proj(qr)
        q = q.unflatten(-1, (self.n_heads, self.head_dim))  # normalised per head and roped as attention loads it
        # Window entries in the storage format, once: attention reads this step's rows and the ring
        # the same way, and the ring gets these bytes, so a position has one value wherever it is read.
        kv = ops.store_rows(kv_a, cache.window, rd, norm=self.kv_norm.as_row_norm(rotary))
        ring = cache.window.flatten(0, 1)
        idx, store = step.window_idx, None
        if self.compressor is not None:
            comp = step.compression(self.ratio)
            store = cache.main.flatten(0, 1)
            proj = linear_fp32(x, self.comp_proj.weight())  # fp32 whatever the model dtype
            main, index = proj.split(2 * self.compressor.wkv.out_features, dim=1) if self.indexer else (proj, None)
            entries, norm = self.compressor.update(main, comp, cache.comp, x.dtype)
            ops.store_rows(entries, store, rd, comp.entry_rows, norm)
            if self.indexer is not None:
                idx = self.indexer.select(iq[0], iw[0], index, step, comp, cache)
            else:  # HCA: every closed block, visible once p >= ratio * (s + 1) - 1 (step metadata)
                idx = comp.attn_idx
            # the step's rows into both compressors' tails (after their pools read them): one copy
            ops.copy_rows(cache.tails.flatten(0, 1), comp.state_dst, proj, comp.state_src)
        # rotated back by -pos (only relative position remains) in the attention's launch
        q_norm = ops.RowNorm(None, self.eps, rotary)  # the per-head query norm (no gain) with its RoPE
        o = ops.paged_sparse_attention(q, kv, ring, store, idx, self.attn_sink, self.scale, rd, rotary, q_norm)
        ops.copy_rows(ring, step.ring_dst, kv, step.ring_src)
        o = o.view(x.shape[0], self.groups, -1)
        o = self.wo_a.grouped(o, self.groups)
        return self.wo_b(o.flatten(1))
