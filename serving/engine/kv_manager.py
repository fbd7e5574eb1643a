"""Pages and state slots of the model's KVCache: allocation, exact bytes, prefix sharing.

A page holds 128 token positions of every layer's compressed KV (32 CSA + 32 indexer entries, 1 HCA
entry); a state slot holds one sequence's SWA window ring and compressor tails. The manager only
hands out ids; the model reads and writes the tensors behind them.

Prefix sharing: complete pages of a prompt are registered under a hash chain of their token
blocks, together with a copy of the state slot taken at that page boundary (a "snapshot" slot).
A later prompt with the same leading blocks takes references on those pages and copies the
snapshot into its own slot, so it starts computing at the boundary. Pages are refcounted by the
sequences that hold them; a cached page no sequence holds counts as free and is evicted
(least recently used entry first) when a fresh page is needed.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from v4d.serving.engine.sequence import Sequence


@dataclass(frozen=True)
class PrefixEntry:
    pages: tuple[int, ...]
    snapshot: int  # state slot id holding the state at the boundary


class KVManager:
    def __init__(
        self,
        num_pages: int,
        num_slots: int,
        page_tokens: int = 128,
        page_bytes: int = 1,
        slot_bytes: int = 1,
        num_snapshots: int = 0,
        copy_slot: Callable[[int, int], None] | None = None,
    ):
        if num_pages < 1 or num_slots < 1:
            raise ValueError(f"KV budget too small: {num_pages} pages, {num_slots} state slots")
        self.num_pages, self.num_slots, self.page_tokens = num_pages, num_slots, page_tokens
        self.page_bytes, self.slot_bytes = page_bytes, slot_bytes
        self.copy_slot = copy_slot
        self.ref = [0] * num_pages
        self.free_pages: deque[int] = deque(range(num_pages))
        self.free_slots: deque[int] = deque(range(num_slots))
        # Snapshot slots follow the sequence slots in the same KVCache.
        self.free_snapshots: deque[int] = deque(range(num_slots, num_slots + num_snapshots))
        self.num_snapshots = num_snapshots if copy_slot else 0
        self.entries: OrderedDict[bytes, PrefixEntry] = OrderedDict()
        self.page_entries: dict[int, set[bytes]] = {}
        self.num_used_pages = 0
        self.prefix_queries = 0  # prompt tokens looked up / found, as vLLM's prefix-cache counters
        self.prefix_hits = 0

    # -- accounting -----------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        """Unreferenced pages, cached ones included (they are evicted on demand)."""
        return self.num_pages - self.num_used_pages

    @property
    def num_used_slots(self) -> int:
        return self.num_slots - len(self.free_slots)

    @property
    def capacity_bytes(self) -> int:
        return self.num_pages * self.page_bytes + self.num_slots * self.slot_bytes

    @property
    def used_bytes(self) -> int:
        return self.num_used_pages * self.page_bytes + self.num_used_slots * self.slot_bytes

    @property
    def utilization(self) -> float:
        return self.used_bytes / self.capacity_bytes

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_tokens

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_tokens)

    # -- allocation -----------------------------------------------------------------------
    def admit(self, seq: Sequence) -> bool:
        """Give `seq` a state slot and pages for all its tokens (reusing a cached prefix); False if they don't fit."""
        if not self.free_slots:
            return False
        entry, boundary = self._lookup(seq)
        shared = len(entry.pages) if entry else 0
        if self.pages_for(seq.num_tokens) - shared > self.num_free_pages - self._cached_free(entry):
            return False
        seq.slot = self.free_slots.popleft()
        self.prefix_queries += len(seq.prompt)
        if entry:
            for p in entry.pages:
                self._take(p)
            seq.pages = list(entry.pages)
            self.copy_slot(entry.snapshot, seq.slot)
            seq.num_computed = seq.num_cached = boundary
            self.prefix_hits += boundary
            self.entries.move_to_end(self._key(seq.prompt, boundary))
        return self.grow(seq, seq.num_tokens)

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Extend `seq`'s pages to cover `num_tokens` positions; False (nothing taken) if they don't fit."""
        need = self.pages_for(num_tokens) - len(seq.pages)
        if need > self.num_free_pages:
            return False
        for _ in range(need):
            p = self._fresh_page()
            self._take(p)
            seq.pages.append(p)
        return True

    def free(self, seq: Sequence) -> None:
        for p in seq.pages:
            self.ref[p] -= 1
            if self.ref[p] == 0:
                self.num_used_pages -= 1
                if not self.page_entries.get(p):
                    self.free_pages.append(p)
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
        seq.pages, seq.slot = [], -1

    def _take(self, p: int) -> None:
        if self.ref[p] == 0:
            self.num_used_pages += 1
        self.ref[p] += 1

    def _fresh_page(self) -> int:
        while not self.free_pages:
            self._evict(next(iter(self.entries)))
        return self.free_pages.popleft()

    def _cached_free(self, entry: PrefixEntry | None) -> int:
        """Unreferenced pages of `entry`: counted free, but admit takes them rather than fresh ones."""
        return sum(1 for p in entry.pages if self.ref[p] == 0) if entry else 0

    # -- prefix cache ---------------------------------------------------------------------
    def snapshot_boundary(self, seq: Sequence) -> int:
        """Last page boundary strictly inside the prompt (one prompt token must remain to produce logits)."""
        if not self.num_snapshots:
            return 0
        return (len(seq.prompt) - 1) // self.page_tokens * self.page_tokens

    def _key(self, prompt: list[int], boundary: int) -> bytes:
        return hashlib.blake2b(array("q", prompt[:boundary]).tobytes(), digest_size=16).digest()

    def _lookup(self, seq: Sequence) -> tuple[PrefixEntry | None, int]:
        if seq.num_computed or not self.entries:
            return None, 0
        b = self.snapshot_boundary(seq)
        while b > 0:
            entry = self.entries.get(self._key(seq.prompt, b))
            if entry:
                return entry, b
            b -= self.page_tokens
        return None, 0

    def maybe_snapshot(self, seq: Sequence) -> None:
        """After a forward: if `seq` just reached its snapshot boundary, cache its complete pages and state."""
        b = self.snapshot_boundary(seq)
        if b == 0 or seq.num_computed != b or seq.num_cached == b:
            return
        key = self._key(seq.prompt, b)
        if key in self.entries:
            return
        if not self.free_snapshots:
            self._evict(next(iter(self.entries)))
        snap = self.free_snapshots.popleft()
        self.copy_slot(seq.slot, snap)
        entry = PrefixEntry(tuple(seq.pages[: b // self.page_tokens]), snap)
        self.entries[key] = entry
        for p in entry.pages:
            self.page_entries.setdefault(p, set()).add(key)

    def _evict(self, key: bytes) -> None:
        entry = self.entries.pop(key)
        self.free_snapshots.append(entry.snapshot)
        for p in entry.pages:
            keys = self.page_entries[p]
            keys.discard(key)
            if not keys:
                del self.page_entries[p]
                if self.ref[p] == 0:
                    self.free_pages.append(p)
