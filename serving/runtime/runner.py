"""`ModelRunner`: the one place that owns a replica's device, dtype, rank and the packed batch.

The engine hands it the scheduler's batch ((sequence, tokens to compute) pairs); it packs the chunks
against each sequence's cache and runs the model's step. With `micro_batches=2` a decode batch is
split in two halves that run at once on two threads, each on its own channel tag (see
runtime/channels.py): while one half waits for its experts on the shards, the other computes its
attention (DeepSeek's dual micro-batch overlap; it pays only when experts are remote). Prefill
chunks always run as one batch.

`step` runs a packed batch: through `graphs` (decode steps captured per batch-size bucket,
serving/model/graphs.py) when the engine set them up on CUDA and the batch fits one, else eagerly
through `model.forward`.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from v4d.serving.model.cache import Fmt, KVCache, SeqCache
from v4d.serving.model.graphs import DecodeGraphs
from v4d.serving.runtime.channels import TAGS, set_tag


class ModelRunner:
    def __init__(
        self,
        model: Any,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        rank: int = 0,
        world_size: int = 1,
        micro_batches: int = 1,
    ):
        if micro_batches not in range(1, TAGS + 1):
            raise ValueError(f"micro_batches: expected 1..{TAGS}, got {micro_batches}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0..{world_size - 1}, got {rank}")
        self.device, self.dtype, self.rank, self.world_size = torch.device(device), dtype, rank, world_size
        self.model = model.to(self.device)
        self.cfg = model.cfg
        self.micro_batches = micro_batches
        self.graphs: DecodeGraphs | None = None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="v4d-micro-batch") if micro_batches > 1 else None

    def new_cache(self, num_pages: int, num_slots: int, fmt: Fmt | None = None) -> KVCache:
        """The replica's KV cache on its device, in `fmt` (default: the plain format of its dtype)."""
        return KVCache(self.cfg, num_pages, num_slots, dtype=self.dtype, device=self.device, fmt=fmt)

    def step(self, chunks: Sequence[tuple[Any, SeqCache]], kv: KVCache) -> list[torch.Tensor]:
        out = self.graphs(chunks) if self.graphs is not None else None
        return out if out is not None else self.model.forward(chunks, kv)

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
