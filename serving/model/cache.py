"""KV state of the V4 model: compressed entries in fixed-size pages, per-request state in slots.

Layout (deepseek-v4.md §7.1): a page covers `sizing.page_tokens(cfg)` = 128 token positions, the
lcm of the CSA and HCA ratios. Per page and layer it holds 128/ratio main entries (32 for CSA, 1 for HCA) and, on
CSA layers, 32 lightning-indexer keys. A state slot holds, per layer, the 128-entry window ring and
the compressor tails (fp32 value + gate of the not-yet-closed positions; CSA keeps the previous
block too, for the overlap). The engine owns allocation: it hands the model a `SeqCache` naming a
slot and the page ids of the sequence; the model only reads and writes those.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from v4d.serving import sizing
from v4d.serving.config import ModelConfig

Fmt = Literal["deployed", "bf16", "fp32"]


@dataclass
class SeqCache:
    """One sequence's view of the cache. `forward` advances `num_tokens` by the chunk it ran."""

    slot: int
    page_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0


# -- byte accounting (exact: the sizes of the tensors KVCache allocates) ---------------------------
def entry_bytes(cfg: ModelConfig, fmt: Fmt) -> tuple[int, int]:
    """(main entry, indexer key) bytes: the sheet's deployed/bf16 figures, or fp32 (4 B per dim)."""
    if fmt == "fp32":
        return 4 * cfg.head_dim, 4 * cfg.index_head_dim
    return sizing.main_entry_bytes(cfg, fmt), sizing.indexer_entry_bytes(cfg, fmt)


def compressor_shape(ratio: int, width: int) -> tuple[int, int]:
    """(rows, cols) of one compressor's tail state: CSA keeps the previous block plus the open one,
    each row holding both branches (2 x width); HCA keeps the open block at `width`."""
    return (2 * ratio, 2 * width) if ratio == 4 else (ratio, width)


def _cache_layers(cfg: ModelConfig, with_mtp: bool) -> range:
    return range(cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if with_mtp else 0))


def page_bytes(cfg: ModelConfig, fmt: Fmt, with_mtp: bool = False) -> int:
    """One page over every layer: page_tokens/ratio main entries, plus as many indexer keys on CSA."""
    main, index = entry_bytes(cfg, fmt)
    per_page = sizing.page_tokens(cfg)
    total = 0
    for layer in _cache_layers(cfg, with_mtp):
        ratio = cfg.compress_ratios[layer]
        if ratio:
            total += per_page // ratio * (main + (index if ratio == 4 else 0))
    return total


def slot_bytes(cfg: ModelConfig, fmt: Fmt, with_mtp: bool = False) -> int:
    """Window ring in `fmt` plus compressor tails, which stay fp32 in every format (value + gate)."""
    main, _ = entry_bytes(cfg, fmt)
    total = 0
    for layer in _cache_layers(cfg, with_mtp):
        ratio = cfg.compress_ratios[layer]
        total += cfg.sliding_window * main
        widths = (cfg.head_dim, cfg.index_head_dim) if ratio == 4 else (cfg.head_dim,) if ratio else ()
        for width in widths:
            rows, cols = compressor_shape(ratio, width)
            total += 2 * rows * cols * 4
    return total


# -- storage ------------------------------------------------------------------------------------
@dataclass
class CompressorState:
    """Per-slot tail of one compressor: projected values and biased gate logits, fp32."""

    kv: torch.Tensor  # [num_slots, rows, cols]
    score: torch.Tensor


@dataclass
class LayerCache:
    window: torch.Tensor  # [num_slots, sliding_window, head_dim] ring, position p at p % window
    main: torch.Tensor | None = None  # [num_pages, 128 / ratio, head_dim]
    index: torch.Tensor | None = None  # [num_pages, 32, index_head_dim] (CSA only)
    comp: CompressorState | None = None
    index_comp: CompressorState | None = None


def _state(num_slots: int, ratio: int, width: int, device) -> CompressorState:
    rows, cols = compressor_shape(ratio, width)
    return CompressorState(torch.zeros(num_slots, rows, cols, device=device),
                           torch.full((num_slots, rows, cols), float("-inf"), device=device))


class KVCache:
    """Every layer's pages and state slots; `dtype` is the storage type of pages and window."""

    def __init__(self, cfg: ModelConfig, num_pages: int, num_slots: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", with_mtp: bool = False):
        self.cfg, self.num_pages, self.num_slots, self.dtype = cfg, num_pages, num_slots, dtype
        self.layers: dict[int, LayerCache] = {}
        per_page = sizing.page_tokens(cfg)
        for layer in _cache_layers(cfg, with_mtp):
            ratio = cfg.compress_ratios[layer]
            lc = LayerCache(torch.zeros(num_slots, cfg.sliding_window, cfg.head_dim, dtype=dtype, device=device))
            if ratio:
                lc.main = torch.zeros(num_pages, per_page // ratio, cfg.head_dim, dtype=dtype, device=device)
                lc.comp = _state(num_slots, ratio, cfg.head_dim, device)
            if ratio == 4:
                lc.index = torch.zeros(num_pages, per_page // ratio, cfg.index_head_dim, dtype=dtype,
                                       device=device)
                lc.index_comp = _state(num_slots, ratio, cfg.index_head_dim, device)
            self.layers[layer] = lc

    def layer(self, layer: int) -> LayerCache:
        try:
            return self.layers[layer]
        except KeyError:
            raise ValueError(f"layer {layer} has no KV state here (MTP layers need KVCache(with_mtp=True))") from None

    @property
    def page_nbytes(self) -> int:
        """Bytes one page actually occupies in memory, summed over layers."""
        return sum(t[0].nbytes for lc in self.layers.values() for t in (lc.main, lc.index) if t is not None)

    @property
    def slot_nbytes(self) -> int:
        total = 0
        for lc in self.layers.values():
            total += lc.window[0].nbytes
            for st in (lc.comp, lc.index_comp):
                if st is not None:
                    total += st.kv[0].nbytes + st.score[0].nbytes
        return total

    def check_pages(self, seq: SeqCache, num_tokens: int) -> None:
        need = sizing.pages_for(self.cfg, num_tokens)
        if len(seq.page_ids) < need:
            raise ValueError(f"SeqCache(slot={seq.slot}).page_ids: {num_tokens} tokens need {need} pages, "
                             f"got {len(seq.page_ids)}")
        if not 0 <= seq.slot < self.num_slots:
            raise ValueError(f"SeqCache.slot: expected 0..{self.num_slots - 1}, got {seq.slot}")


def write_entries(store: torch.Tensor, page_ids: list[int], first: int, entries: torch.Tensor) -> None:
    """Write compressed entries first..first+n-1 of a sequence into its pages."""
    per_page = store.shape[1]
    s = torch.arange(first, first + entries.shape[0], device=store.device)
    pages = torch.tensor(page_ids, device=store.device)[s // per_page]
    store[pages, s % per_page] = entries.to(store.dtype)


def read_entries(store: torch.Tensor, page_ids: list[int], n: int) -> torch.Tensor:
    """Entries 0..n-1 of a sequence, gathered from its pages: [n, C]."""
    used = -(-n // store.shape[1])
    return store[torch.tensor(page_ids[:used], device=store.device)].flatten(0, 1)[:n]
