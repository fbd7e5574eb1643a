"""`ModelRunner`: the one place that owns a replica's device, dtype, rank and the packed batch.

The engine hands it the scheduler's batch ((sequence, tokens to compute) pairs); it packs the chunks
against each sequence's cache and runs the model's step. With `micro_batches=2` a decode batch is
split in two halves that run at once on two threads, each on its own channel tag (see
runtime/channels.py): while one half waits for its experts on the shards, the other computes its
attention (DeepSeek's dual micro-batch overlap; it pays only when experts are remote). Prefill
chunks always run as one batch.

`step` is the callable that runs a packed batch (`model.forward` by default): a CUDA-graph runner
for decode batches (captured per batch size) replaces it here, and nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from v4d.serving.model.cache import KVCache, SeqCache
from v4d.serving.runtime.channels import TAGS, set_tag


class ModelRunner:
    def __init__(
        self, model: Any, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
        rank: int = 0, world_size: int = 1, micro_batches: int = 1,
    ):
        if micro_batches not in range(1, TAGS + 1):
            raise ValueError(f"micro_batches: expected 1..{TAGS}, got {micro_batches}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0..{world_size - 1}, got {rank}")
        self.device, self.dtype, self.rank, self.world_size = torch.device(device), dtype, rank, world_size
        self.model = model.to(self.device)
        self.cfg = model.cfg
        self.micro_batches = micro_batches
        self.step: Callable[[Sequence[tuple[Any, SeqCache]], KVCache], list[torch.Tensor]] = self.model.forward
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="v4d-micro-batch") if micro_batches > 1 else None

    def new_cache(self, num_pages: int, num_slots: int) -> KVCache:
        return KVCache(self.cfg, num_pages, num_slots, dtype=self.dtype, device=self.device)

    @staticmethod
    def pack(batch: Sequence[tuple[Any, int]]) -> list[tuple[list[int], SeqCache]]:
        """Each sequence's next `n` tokens against its slot and pages, from what it has computed."""
        return [
            (seq.token_ids[seq.num_computed : seq.num_computed + n], SeqCache(seq.slot, seq.pages, seq.num_computed))
            for seq, n in batch
        ]

    def run(self, batch: Sequence[tuple[Any, int]], kv: KVCache) -> list[torch.Tensor]:
        """Logits of each sequence's last new token, in batch order."""
        chunks = self.pack(batch)
        if self.pool is None or len(chunks) < 2 or any(n != 1 for _, n in batch):
            return self.step(chunks, kv)
        half = len(chunks) // 2
        second = self.pool.submit(self._tagged, 1, chunks[half:], kv)
        first = self._tagged(0, chunks[:half], kv)
        return first + second.result()

    def _tagged(self, tag: int, chunks: list[tuple[list[int], SeqCache]], kv: KVCache) -> list[torch.Tensor]:
        set_tag(tag)
        return self.step(chunks, kv)
