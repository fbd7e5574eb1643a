"""CUDA graphs for decode steps, one per batch-size bucket.

A decode step launches a few hundred small kernels; replaying a captured graph removes their
launch and Python overhead. Shapes must not change between replays, so a decode batch is padded to
the next bucket size with rows of a scratch slot and page (their writes land there and nothing
reads them), and its metadata is built as a static `Step` (serving/model/step.py) whose tensors
are copied into the captured step's buffers before each replay. One graph per bucket is captured
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
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, Step, torch.Tensor]] = {}

    def _step(self, chunks: list[tuple[int, int, int, Sequence[int]]], size: int) -> Step:
        pad = [(0, 1, self.scratch_slot, [self.scratch_page])] * (size - len(chunks))
        return Step.build(
            self.model.cfg,
            chunks + pad,
            self.kv.num_slots,
            self.device,
            static_pages=self.max_pages,
            scratch_page=self.scratch_page,
        )

    def __call__(self, batch: Sequence[tuple[Sequence[int] | torch.Tensor, SeqCache]]) -> list[torch.Tensor] | None:
        """Last-token logits per sequence of a decode-only batch, or None (run it eagerly)."""
        size = bucket_for(len(batch), self.buckets)
        ids = [torch.as_tensor(t, dtype=torch.long).flatten() for t, _ in batch]
        if size is None or any(t.numel() != 1 for t in ids) or any(len(s.page_ids) > self.max_pages for _, s in batch):
            return None
        chunks = [(s.num_tokens, 1, s.slot, s.page_ids) for _, s in batch]
        step = self._step(chunks, size)
        tokens = torch.zeros(size, dtype=torch.long)
        tokens[: len(batch)] = torch.cat(ids)
        tokens = tokens.to(self.device)
        with torch.inference_mode():
            if self.use_graphs:
                graph, static_ids, static_step, out = self._graph(size)
                static_ids.copy_(tokens)
                static_step.copy_(step)
                graph.replay()
                logits = out.clone()
            else:
                logits = self.model.logits(self.model.blocks(tokens, step, self.kv))
        for _, seq in batch:
            seq.num_tokens += 1
        return list(logits[: len(batch)])

    def _graph(self, size: int):
        if size not in self.graphs:
            step = self._step([], size)  # padding rows only: capture writes nothing live
            ids = torch.zeros(size, dtype=torch.long, device=self.device)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up (allocator, kernel compilation) before capture
                self.model.logits(self.model.blocks(ids, step, self.kv))
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.model.logits(self.model.blocks(ids, step, self.kv))
            self.graphs[size] = (graph, ids, step, out)
        return self.graphs[size]
