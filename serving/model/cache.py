"""KV state of the V4 model: compressed entries in fixed-size pages, per-request state in slots.

Layout (docs/deepseek-v4.md §7.1): a page covers `sizing.page_tokens(cfg)` = 128 token positions, the
lcm of the CSA and HCA ratios. Per page and layer it holds 128/ratio main entries (32 for CSA, 1 for HCA) and, on
CSA layers, 32 lightning-indexer keys. A state slot holds, per layer, the 128-entry window ring and
the compressor tails (fp32 value + gate of the not-yet-closed positions; CSA keeps the previous
block too, for the overlap), both as rings indexed by position. Rows are stored in the cache's
format: "deployed" packs main entries (pages and window) as FP8 + BF16 rope and indexer keys as FP4
(kernels/kv_format.py), "bf16"/"fp32" keep plain rows. The engine owns allocation: it hands the
model a `SeqCache` naming a slot and the page ids of the sequence; the model only reads and writes
those.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from v4d.serving import sizing
from v4d.serving.config import ModelConfig
from v4d.serving.sizing import KvFmt as Fmt


@dataclass
class SeqCache:
    """One sequence's view of the cache. `forward` advances `num_tokens` by the chunk it ran."""

    slot: int
    page_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0


# -- shapes (byte sizes: sizing.page_bytes / slot_bytes, which KVCache allocates exactly) -------------
def compressor_shape(ratio: int, width: int) -> tuple[int, int]:
    """(rows, cols) of one compressor's tail ring: CSA keeps the previous block plus the open one
    (2 x ratio positions), each row holding both branches (2 x width); HCA the open block at `width`.
    Position p of the sequence sits in row p % rows."""
    return (2 * ratio, 2 * width) if ratio == 4 else (ratio, width)


# -- storage ------------------------------------------------------------------------------------
@dataclass
class CompressorState:
    """Per-slot tail of one compressor: projected values and (unbiased) gate logits side by side,
    fp32, as the compressor's projection makes them, so one row copy writes both."""

    tail: torch.Tensor  # [num_slots, rows, 2 * cols]: values | gate logits

    @property
    def kv(self) -> torch.Tensor:
        return self.tail[..., : self.tail.shape[-1] // 2]

    @property
    def score(self) -> torch.Tensor:
        return self.tail[..., self.tail.shape[-1] // 2 :]


@dataclass
class LayerCache:
    """One layer's tensors. Rows are entries in the cache's format: `width` floats (fp32/bf16) or the
    packed deployed bytes (uint8, kernels/kv_format.py)."""

    window: torch.Tensor  # [num_slots, sliding_window, row] ring, position p at p % window
    main: torch.Tensor | None = None  # [num_pages, page_tokens / ratio, row]
    index: torch.Tensor | None = None  # [num_pages, page_tokens / 4, row] (CSA only)
    comp: CompressorState | None = None
    index_comp: CompressorState | None = None
    # [num_slots, rows, cols]: comp's and index_comp's tails side by side (they are column views of
    # it), in the order of the layer's joint compressor projection, so one row copy writes both
    tails: torch.Tensor | None = None


def _states(num_slots: int, ratio: int, widths: list[int], device) -> tuple[torch.Tensor, list[CompressorState]]:
    """One tensor of the tails of compressors of these widths, side by side, and each one's state (a view)."""
    cols = [2 * compressor_shape(ratio, w)[1] for w in widths]
    tails = torch.zeros(num_slots, compressor_shape(ratio, widths[0])[0], sum(cols), device=device)
    states = [CompressorState(t) for t in tails.split(cols, dim=-1)]
    for state in states:
        state.score.fill_(float("-inf"))
    return tails, states


_PLAIN = {"fp32": torch.float32, "bf16": torch.bfloat16}


class KVCache:
    """Every layer's pages and state slots. `fmt` is the storage format of pages and window rings:
    "deployed" (FP8 + BF16 rope main entries, FP4 indexer keys, packed bytes), "bf16" or "fp32";
    by default the plain format of `dtype`."""

    def __init__(
        self,
        cfg: ModelConfig,
        num_pages: int,
        num_slots: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        with_mtp: bool = False,
        fmt: Fmt | None = None,
    ):
        fmt = fmt or ("bf16" if dtype == torch.bfloat16 else "fp32")
        if fmt not in ("deployed", *_PLAIN):
            raise ValueError(f"KVCache.fmt: expected deployed, bf16 or fp32, got {fmt!r}")
        self.cfg, self.num_pages, self.num_slots, self.fmt = cfg, num_pages, num_slots, fmt
        self.dtype = _PLAIN.get(fmt, torch.uint8)
        self.layers: dict[int, LayerCache] = {}
        per_page = sizing.page_tokens(cfg)
        if fmt == "deployed":
            main_row, index_row = sizing.main_entry_bytes(cfg, fmt), sizing.indexer_entry_bytes(cfg, fmt)
        else:
            main_row, index_row = cfg.head_dim, cfg.index_head_dim

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=self.dtype, device=device)

        for layer in sizing.cached_layers(cfg, with_mtp):
            ratio = cfg.compress_ratios[layer]
            lc = LayerCache(zeros(num_slots, cfg.sliding_window, main_row))
            if ratio:
                lc.main = zeros(num_pages, per_page // ratio, main_row)
                widths = [cfg.head_dim, *([cfg.index_head_dim] if ratio == 4 else [])]
                lc.tails, (lc.comp, *rest) = _states(num_slots, ratio, widths, device)
            if ratio == 4:
                lc.index = zeros(num_pages, per_page // ratio, index_row)
                lc.index_comp = rest[0]
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
                    total += st.tail[0].nbytes
        return total

    def check_pages(self, seq: SeqCache, num_tokens: int) -> None:
        need = sizing.pages_for(self.cfg, num_tokens)
        if len(seq.page_ids) < need:
            raise ValueError(
                f"SeqCache(slot={seq.slot}).page_ids: {num_tokens} tokens need {need} pages, got {len(seq.page_ids)}"
            )
        if not 0 <= seq.slot < self.num_slots:
            raise ValueError(f"SeqCache.slot: expected 0..{self.num_slots - 1}, got {seq.slot}")
