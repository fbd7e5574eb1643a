"""Hybrid attention of one layer (deepseek-v4.md §2.1): SWA-only, CSA or HCA by `compress_ratios`.

Shared-KV MQA: one 512-d entry per cached position is both key and value. Queries come from a
low-rank latent (also the indexer's), get a per-head RMS norm without gain and RoPE. Each query
attends, in one softmax with a per-head sink, to the window (its last `sliding_window` positions,
itself included) and to compressed entries of closed blocks: all of them on HCA layers, the
indexer's top-k on CSA layers. The output is rotated back by -t (only relative position remains)
and projected per group of heads, then to the model width.

Dense projections run over every token of the batch at once; the cache-dependent part runs per
sequence span.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from v4d.kernels import ops
from v4d.serving.config import ModelConfig
from v4d.serving.model.cache import LayerCache, read_entries, write_entries
from v4d.serving.model.compressor import Compressor
from v4d.serving.model.indexer import Indexer
from v4d.serving.model.linear import Linear
from v4d.serving.model.norm import RMSNorm, rms_normalize
from v4d.serving.model.rope import Rope


@dataclass(frozen=True)
class Span:
    """Rows `rows` of the flat batch are positions start.. of the sequence in `slot`."""

    rows: slice
    start: int
    slot: int
    page_ids: list[int]


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

    def forward(self, x: torch.Tensor, pos: torch.Tensor, spans: list[Span], cache: LayerCache) -> torch.Tensor:
        """x: [N, d] (already normalised), pos: [N] positions. Writes the spans' state; returns [N, d]."""
        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))
        q = self.rope(rms_normalize(q, self.eps).to(x.dtype), pos)
        # Round window entries to the storage type now, so a position reads the same value whether it
        # comes from this chunk or, later, from the ring.
        kv = self.rope(self.kv_norm(self.wkv(x)), pos).to(cache.window.dtype).to(x.dtype)
        comp = self.compressor.project(x) if self.compressor is not None else None
        index = self.indexer.project(x, qr, pos) if self.indexer is not None else None
        o = torch.empty_like(q)
        for sp in spans:
            kv_all, idx = self._window(kv[sp.rows], sp, cache.window)
            if self.compressor is not None:
                kv_all, idx = self._compressed(kv_all, idx, comp, index, sp, cache)
            o[sp.rows] = ops.sparse_attention(q[sp.rows], kv_all, idx.to(torch.int32), self.attn_sink, self.scale)
        o = self.rope(o, pos, inverse=True).view(x.shape[0], self.groups, -1)
        o = self.wo_a.grouped(o, self.groups)
        return self.wo_b(o.flatten(1))

    def _window(self, kv: torch.Tensor, sp: Span, ring: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries lo..end-1 (ring + this chunk) and each query's window indices into them."""
        w, t = self.window, kv.shape[0]
        start, end = sp.start, sp.start + t
        lo = max(0, start - w + 1)
        dev = kv.device
        old = ring[sp.slot, torch.arange(lo, start, device=dev) % w].to(kv.dtype)
        p = torch.arange(start, end, device=dev)[:, None] - w + 1 + torch.arange(w, device=dev)
        idx = torch.where(p >= 0, p - lo, -1)
        keep = min(t, w)
        ring[sp.slot, torch.arange(end - keep, end, device=dev) % w] = kv[t - keep :].to(ring.dtype)
        return torch.cat([old, kv]), idx

    def _compressed(self, kv_all: torch.Tensor, idx: torch.Tensor, comp: tuple[torch.Tensor, torch.Tensor],
                    index: dict[str, torch.Tensor] | None, sp: Span, cache: LayerCache
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this layer's visible compressed entries (and their indices) to the window's."""
        t = idx.shape[0]
        kv_c, score = comp[0][sp.rows], comp[1][sp.rows]
        entries, first = self.compressor.step(kv_c, score, sp.start, cache.comp, sp.slot, kv_all.dtype)
        if entries.shape[0]:
            write_entries(cache.main, sp.page_ids, first, entries)
        if self.indexer is not None:  # runs even with nothing visible: it advances its own compressor
            chosen = self.indexer.select(index, sp.rows, sp.start, sp.slot, sp.page_ids, cache)
        n_closed = (sp.start + t) // self.ratio
        if n_closed == 0:
            return kv_all, idx
        if self.indexer is None:  # HCA: every closed block, visible once t >= ratio * (s + 1) - 1
            visible = (torch.arange(sp.start, sp.start + t, device=idx.device) + 1) // self.ratio
            s = torch.arange(n_closed, device=idx.device)
            chosen = torch.where(s < visible[:, None], s, -1)
        chosen = chosen.long()
        offset = kv_all.shape[0]
        kv_all = torch.cat([kv_all, read_entries(cache.main, sp.page_ids, n_closed).to(kv_all.dtype)])
        return kv_all, torch.cat([idx, torch.where(chosen >= 0, chosen + offset, -1)], dim=1)
