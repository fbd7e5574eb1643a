"""CUDA graphs for decode steps, one per batch-size bucket.

A decode step launches a few hundred small kernels; replaying a captured graph removes their
launch and Python overhead. Shapes must not change between replays, so a decode batch is padded to
the next bucket size with rows of a scratch slot and page (their writes land there and nothing
reads them). The graph holds the whole step: its metadata is derived on the device from four small
inputs (token ids, positions, slots, block table; `Step.decode` in serving/model/step.py), so a
replay costs two host-to-device copies and no per-step index building on the host. One graph per bucket is captured
on first use from a step of padding rows only, so capturing never touches a live sequence.

Only decode-only batches of at most the largest bucket whose sequences fit in `max_pages` take
this path; anything else (prefill chunks, mixed steps) returns None and runs eagerly. With
`use_graphs=False` (the off switch, and CPU tests) the same padded static step runs eagerly, so
the bucketing and padding are checked without a GPU; scripts/gpu-check.sh compares graph replays
with eager logits on CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from v4d.serving.model.cache import KVCache, SeqCache
from v4d.serving.model.step import Step

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket_for(n: int, buckets: Sequence[int] = BUCKETS) -> int | None:
    """Smallest bucket holding n rows, None past the largest."""
    return next((b for b in buckets if b >= n), None)


def graphs_enabled() -> bool:
    """The off switch: V4D_CUDA_GRAPHS=0 runs every step eagerly."""
    return os.environ.get("V4D_CUDA_GRAPHS", "1") != "0"


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        kv: KVCache,
        max_pages: int,
        scratch_slot: int,
        scratch_page: int,
        buckets: Sequence[int] = BUCKETS,
        use_graphs: bool | None = None,
    ):
        self.model, self.kv, self.max_pages = model, kv, max_pages
        self.scratch_slot, self.scratch_page, self.buckets = scratch_slot, scratch_page, tuple(buckets)
        device = kv.layer(0).window.device
        self.device = device
        self.use_graphs = (device.type == "cuda" and graphs_enabled()) if use_graphs is None else use_graphs
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, batch: Sequence[tuple[Sequence[int] | torch.Tensor, SeqCache]]) -> list[torch.Tensor] | None:
        """Last-token logits per sequence of a decode-only batch, or None (run it eagerly)."""
        step = self.inputs(batch)
        if step is None:
            return None
        inputs, table = step
        with torch.inference_mode():
            if self.use_graphs:
                graph, static_inputs, static_table, out = self._graph(inputs.shape[1])
                static_inputs.copy_(inputs, non_blocking=True)
                static_table.copy_(table, non_blocking=True)
                graph.replay()
                logits = out.clone()
            else:
                logits = self.forward(inputs.to(self.device), table.to(self.device))
        for _, seq in batch:
            seq.num_tokens += 1
        return list(logits[: len(batch)])

    def inputs(
        self, batch: Sequence[tuple[Sequence[int] | torch.Tensor, SeqCache]]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The static step's inputs on the host, (token ids, positions, slots) rows [3, bucket] and the
        block table [bucket, max_pages], or None where the batch is not a graph step."""
        size = bucket_for(len(batch), self.buckets)
        ids = [torch.as_tensor(t, dtype=torch.long).flatten() for t, _ in batch]
        if size is None or any(t.numel() != 1 for t in ids) or any(len(s.page_ids) > self.max_pages for _, s in batch):
            return None
        # padding rows at position 0 of the scratch slot and page
        inputs = torch.zeros(3, size, dtype=torch.long)
        inputs[0, : len(batch)] = torch.cat(ids)
        inputs[1, : len(batch)] = torch.tensor([s.num_tokens for _, s in batch])
        inputs[2] = self.scratch_slot
        inputs[2, : len(batch)] = torch.tensor([s.slot for _, s in batch])
        table = torch.full((size, self.max_pages), -1, dtype=torch.long)
        table[:, 0] = self.scratch_page
        for b, (_, s) in enumerate(batch):
            table[b, : len(s.page_ids)] = torch.as_tensor(s.page_ids, dtype=torch.long)
        return inputs, table

    def forward(self, inputs: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Logits of a static decode step: (token ids, positions, slots) rows and the block table."""
        step = Step.decode(self.model.cfg, inputs[1], inputs[2], table, self.kv.num_slots, self.scratch_page)
        return self.model.logits(self.model.blocks(inputs[0], step, self.kv))

    def _graph(self, size: int):
        if size not in self.graphs:
            # padding rows only (scratch slot and page): capturing writes nothing live
            inputs = torch.zeros(3, size, dtype=torch.long, device=self.device)
            inputs[2] = self.scratch_slot
            table = torch.full((size, self.max_pages), -1, dtype=torch.long, device=self.device)
            table[:, 0] = self.scratch_page
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up (allocator, kernel compilation) before capture
                self.forward(inputs, table)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.forward(inputs, table)
            self.graphs[size] = (graph, inputs, table, out)
        return self.graphs[size]
