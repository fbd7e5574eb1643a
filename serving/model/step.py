"""Batch metadata of one forward step, built once and shared by every layer.

A step runs several sequences at once, each a chunk of new tokens (prefill chunk or one decode
token) at rows row0..row0+n-1 of the flat batch. Every layer then makes one pass over all rows,
addressing cached state through index tensors built here, never through a Python loop over
sequences:

- window: query row t at position p sees positions p-W+1..p. Those of its own chunk come from the
  step's fresh entries (row index), older ones from its slot's ring (N + slot*W + q % W); after
  attention the last min(n, W) fresh entries of each chunk are written into the ring.
- compression (per ratio m): every row whose position closes a block (p % m == m-1) closes one
  entry; its candidate tokens are rows of this step or rows of the slot's tail ring
  (N + slot*R + q % R, R = 2m on CSA, m on HCA), -1 for the padding before position 0. After
  pooling, the last R positions of each chunk are written to the tail ring.
- pages: entry s of a sequence is row page*E + s % E of the flattened page store, with
  page = block_table[seq, s // E] and E = entries per page.
Positions older than the rings hold are never addressed (a ring holds the last W or R positions,
more than any chunk's first query or first closing block needs), so a slot needs no reset.

`Step.decode` (decode steps replayed as CUDA graphs, serving/model/graphs.py) builds a static step
from device tensors alone (positions, slots, block table): every shape is fixed by (rows,
block-table width), every row gets a compression slot (-1 candidates and a scratch entry row where
its block does not close), visible entries are listed up to the block table's capacity, and no
index is selected by value, so the graph captures the metadata's derivation with the layers and a
replay never syncs with the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from v4d.serving import sizing
from v4d.serving.config import ModelConfig


@dataclass
class Compression:
    """Index tensors of one compression ratio for the step (shared by main and indexer compressors)."""

    ratio: int
    per_page: int  # entries per page
    idx: torch.Tensor  # [E, L] candidates of each closing entry (rows, N + tail rows, -1)
    anchor: torch.Tensor  # [E] position of each closing entry's RoPE: ratio * its entry number
    entry_rows: torch.Tensor  # [E] flat page-store row of each closing entry
    state_src: torch.Tensor  # [M] step rows whose projections go to the tail ring
    state_dst: torch.Tensor  # [M] their flat tail-ring rows
    visible: torch.Tensor  # [N] closed entries visible to each row: (p + 1) // ratio
    max_visible: int  # static steps: the block table's capacity in entries
    # HCA: attention indices of every row, the window's then every visible entry's (page-store rows
    # offset past the step's rows and the rings, -1 pads): [N, W + max_visible]. CSA layers build
    # theirs from the indexer's choice (ops.indexer_topk with the step's table).
    attn_idx: torch.Tensor | None = None


@dataclass
class Step:
    cfg: ModelConfig
    pos: torch.Tensor  # [N] absolute position of each row
    seq: torch.Tensor  # [N] batch index of the row's sequence
    spans: list[tuple[int, int, int]]  # per sequence: (first row, end row, start position)
    block_table: torch.Tensor  # [B, P] page ids, -1 past a sequence's pages
    window_idx: torch.Tensor  # [N, W] fresh rows / N + ring rows / -1
    ring_src: torch.Tensor
    ring_dst: torch.Tensor
    ring_rows: int  # num_slots * W: the flattened rings' length
    _start: torch.Tensor  # [N] per-row copies of the sequence's start, first row, slot
    _row0: torch.Tensor
    _slot: torch.Tensor
    _end: torch.Tensor
    _comp: dict[int, Compression] = field(default_factory=dict)
    static: bool = False
    scratch_row: int = 0  # static steps: the page-store row non-closing rows write their entry to

    @property
    def n_rows(self) -> int:
        return self.pos.shape[0]

    @classmethod
    def build(
        cls,
        cfg: ModelConfig,
        chunks: Sequence[tuple[int, int, int, Sequence[int]]],
        num_slots: int,
        device: torch.device | str,
        static_pages: int = 0,
        scratch_page: int = 0,
    ) -> Step:
        """chunks: per sequence (start position, new tokens, slot, page ids). `static_pages` > 0
        builds a static decode step (one token per chunk, `Step.decode`) with a block table that
        wide; entries of rows whose block does not close go to page `scratch_page`."""
        starts = torch.tensor([c[0] for c in chunks], dtype=torch.long)
        lens = torch.tensor([c[1] for c in chunks], dtype=torch.long)
        slots = torch.tensor([c[2] for c in chunks], dtype=torch.long)
        width = static_pages or max(1, max(len(c[3]) for c in chunks))
        if static_pages and (int(lens.max()) > 1 or max(len(c[3]) for c in chunks) > static_pages):
            raise ValueError(f"static step: expected one token per chunk and at most {static_pages} pages")
        table = torch.full((len(chunks), width), -1, dtype=torch.long)
        for b, c in enumerate(chunks):
            table[b, : len(c[3])] = torch.as_tensor(list(c[3]), dtype=torch.long)
        dev = torch.device(device)
        if static_pages:
            return cls.decode(cfg, starts.to(dev), slots.to(dev), table.to(dev), num_slots, scratch_page)
        row0 = torch.cumsum(lens, 0) - lens
        spans = [(int(r), int(r + n), int(s)) for r, n, s in zip(row0, lens, starts, strict=True)]
        seq = torch.repeat_interleave(torch.arange(len(chunks)), lens)
        pos = torch.arange(int(lens.sum())) - row0[seq] + starts[seq]
        rows = (pos, seq, starts[seq], row0[seq], slots[seq], (starts + lens)[seq])
        return cls._assemble(cfg, *(t.to(dev) for t in rows), table.to(dev), spans, num_slots, False, 0)

    @classmethod
    def decode(
        cls,
        cfg: ModelConfig,
        pos: torch.Tensor,
        slots: torch.Tensor,
        table: torch.Tensor,
        num_slots: int,
        scratch_page: int,
    ) -> Step:
        """A static decode step (row b: the one new token of sequence b, at position pos[b]) from
        device tensors alone, with no host sync: serving/model/graphs.py captures it together with
        the layers, so a replay only copies in positions, slots and the block table. Its spans carry
        no start positions (they stay on the device); the caller advances its sequences."""
        b = torch.arange(pos.shape[0], device=pos.device)
        spans = [(i, i + 1, -1) for i in range(pos.shape[0])]
        return cls._assemble(cfg, pos, b, pos, b, slots, pos + 1, table, spans, num_slots, True, scratch_page)

    @classmethod
    def _assemble(
        cls,
        cfg: ModelConfig,
        pos: torch.Tensor,
        seq: torch.Tensor,
        start: torch.Tensor,
        r0: torch.Tensor,
        slot: torch.Tensor,
        end: torch.Tensor,
        table: torch.Tensor,
        spans: list[tuple[int, int, int]],
        num_slots: int,
        static: bool,
        scratch_page: int,
    ) -> Step:
        """Window and ring indices from the per-row tensors (all on one device)."""
        n, w = pos.shape[0], cfg.sliding_window
        q = pos[:, None] - w + 1 + torch.arange(w, device=pos.device)
        window = torch.where(q >= start[:, None], r0[:, None] + q - start[:, None], n + slot[:, None] * w + q % w)
        window = torch.where(q >= 0, window, -1)
        # A decode row always writes its entry to the ring: no data-dependent selection (no sync).
        keep = torch.arange(n, device=pos.device) if static else (pos >= end - w).nonzero().flatten()
        step = cls(
            cfg, pos, seq, spans, table, window, keep, (slot * w + pos % w)[keep], num_slots * w,
            start, r0, slot, end, static=static, scratch_row=scratch_page,
        )  # fmt: skip
        if static:  # everything the layers read, built now
            for ratio in {r for r in cfg.compress_ratios if r}:
                step.compression(ratio)
        return step

    @property
    def entry_offset(self) -> int:
        """Attention index of page-store row 0: past the step's rows and the flattened rings."""
        return self.n_rows + self.ring_rows

    def store_rows(self, seq: torch.Tensor, entry: torch.Tensor, per_page: int) -> torch.Tensor:
        """Flat page-store rows of entries `entry` (-1 stays -1) of sequences `seq` (broadcast)."""
        col = (entry // per_page).clamp(0, self.block_table.shape[1] - 1)
        page = self.block_table[seq, col]
        return torch.where(entry >= 0, page * per_page + entry % per_page, -1)

    def compression(self, ratio: int) -> Compression:
        if ratio not in self._comp:
            self._comp[ratio] = self._build_compression(ratio)
        return self._comp[ratio]

    def _build_compression(self, m: int) -> Compression:
        overlap = m == 4
        tail = 2 * m if overlap else m  # tail-ring rows per slot (cache.compressor_shape)
        pos, n = self.pos, self.n_rows
        closes = (pos + 1) % m == 0
        closing = torch.arange(n, device=pos.device) if self.static else closes.nonzero().flatten()
        e = pos[closing] // m
        offs = torch.arange(-m if overlap else 0, m, device=pos.device)
        q = e[:, None] * m + offs  # [E, L] candidate positions
        start, r0, slot = self._start[closing, None], self._row0[closing, None], self._slot[closing, None]
        idx = torch.where(q >= start, r0 + q - start, n + slot * tail + q % tail)
        idx = torch.where(q >= 0, idx, -1)
        # static: every row writes its tail-ring row (no data-dependent selection, no sync)
        keep = torch.arange(n, device=pos.device) if self.static else (pos >= self._end - tail).nonzero().flatten()
        visible = (pos + 1) // m
        per_page = sizing.page_tokens(self.cfg) // m
        rows = self.store_rows(self.seq[closing], e, per_page)
        if self.static:  # rows whose block stays open pool nothing into a scratch row
            idx = torch.where(closes[:, None], idx, -1)
            rows = torch.where(closes, rows, self.scratch_row * per_page)
        max_visible = self.block_table.shape[1] * per_page if self.static else int(visible.max()) if n else 0
        attn_idx = None
        if not overlap:  # HCA attends to every visible entry: its indices are step metadata
            s = torch.arange(max_visible, device=pos.device)
            s = torch.where(s[None, :] < visible[:, None], s[None, :], -1)
            all_rows = self.store_rows(self.seq[:, None], s, per_page)
            all_rows = torch.where(all_rows >= 0, all_rows + self.entry_offset, -1)
            attn_idx = torch.cat([self.window_idx, all_rows], dim=1)
        return Compression(
            m,
            per_page,
            idx,
            e * m,
            rows,
            keep,
            (self._slot * tail + pos % tail)[keep],
            visible,
            max_visible,
            attn_idx,
        )
