"""Work per layer of one forward step, counted on the CPU (bench/decode.py and tests).

`ops_per_layer`: the number of top-level torch ops a layer's forward dispatches (CPU profiler), where
each call of a `v4d.kernels.ops` function counts as one. An op can launch several CUDA kernels (a
cuBLAS GEMM two, a Triton launcher with split reductions two), so this undercounts launches.

`cuda_launches` / `decode_step_launches`: an estimate of the CUDA kernels a step launches, per layer,
from a run on the CPU with the Triton path in the interpreter taking a GPU's launch decisions
(`launch.as_on_gpu`): every Triton launch, plus every aten op that launches work on CUDA (seen by a
torch dispatch mode; views, allocations and no-op casts launch nothing) times the kernels it
launches there (`CUDA_KERNELS_PER_OP`, fitted to H200 profiles; docs/kernels.md). The step's
metadata and the embedding run outside the layers and are reported apart.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode

from v4d.kernels import ops
from v4d.serving import sizing
from v4d.serving.model import linear
from v4d.serving.model.cache import KVCache, SeqCache
from v4d.serving.model.graphs import DecodeGraphs

# Issue 11's target: launches per layer per decode step (tests/model/test_model_decode.py holds the
# busiest layer to it at batch 1 and 64).
LAUNCH_BUDGET = 40

# Ops that only make a view (no kernel on a GPU); the second count of `ops_per_layer` leaves them out.
VIEW_OPS = frozenset(
    f"aten::{n}"
    for n in (
        "view",
        "slice",
        "flatten",
        "unflatten",
        "unsqueeze",
        "squeeze",
        "select",
        "expand",
        "permute",
        "transpose",
        "t",
        "as_strided",
        "view_as_complex",
        "view_as_real",
        "alias",
        "detach",
        "reshape",
        "_reshape_alias",
        "narrow",
        "split",
        "split_with_sizes",
        "chunk",
        "unbind",
        "conj",
        "_unsafe_view",
        "lift_fresh",
    )
)
# Allocations and metadata: no kernel either.
NO_LAUNCH_OPS = VIEW_OPS | frozenset(
    f"aten::{n}" for n in ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_")
)
# CUDA kernels of one aten op where it is more than one, fitted to H200 profiles of the decode step
# (docs/kernels.md): a cuBLAS GEMM (with its split-K reduction or workspace kernel), a cub scan, a cub
# radix sort (stable: keys, values, histogram and scan passes).
CUDA_KERNELS_PER_OP = {"aten::mm": 2, "aten::addmm": 2, "aten::bmm": 2, "aten::cumsum": 2, "aten::sort": 4}
# A CUDA-graph replay's own launches (graphs.py): two input copies and the logits' clone.
GRAPH_REPLAY_LAUNCHES = 3
OP_NAMES = (
    "paged_sparse_attention",
    "paged_indexer_scores",
    "indexer_topk",
    "gated_pool_indexed",
    "moe_experts",
    "dense_expert",
    "hc_mixes",
    "hc_mixes_sinkhorn",
    "hc_pre",
    "hc_post",
    "rms_norm",
    "rope",
    "pack_main",
    "pack_index",
    "copy_rows",
    "moe_route",
)


def _noop_cast(ev: Any) -> bool:
    """A `.to()`/`.float()` to the tensor's own dtype and device returns it: no copy, no launch."""
    return ev.name == "aten::to" and not any(c.name == "aten::_to_copy" for c in ev.cpu_children)


@contextmanager
def _labelled(model: torch.nn.Module) -> Iterator[None]:
    """Profiler ranges `layer::<i>` around each block and `ops::<name>` around each ops call."""
    saved = {name: getattr(ops, name) for name in OP_NAMES}
    ranges: dict[int, Any] = {}

    def wrap(name: str, fn: Callable) -> Callable:
        def call(*args, **kw):
            with record_function(f"ops::{name}"):
                return fn(*args, **kw)

        return call

    def enter(block, _args):
        ranges[id(block)] = record_function(f"layer::{block.layer}")
        ranges[id(block)].__enter__()

    def leave(block, _args, _out):
        ranges.pop(id(block)).__exit__(None, None, None)

    handles = [h for b in model.layers for h in (b.register_forward_pre_hook(enter), b.register_forward_hook(leave))]
    for name, fn in saved.items():
        setattr(ops, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)
        for h in handles:
            h.remove()


def ops_per_layer(model: torch.nn.Module, run: Callable[[], Any]) -> tuple[dict[int, int], dict[int, int]]:
    """Ops each block of `model` dispatches while `run()` executes one forward step: (all ops,
    ops that may launch work: view ops and no-op casts left out)."""
    with _labelled(model), profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    counts: Counter[int] = Counter()
    launching: Counter[int] = Counter()
    for ev in prof.events():
        if not (ev.name.startswith("aten::") or ev.name.startswith("ops::")):
            continue
        layer, parent = None, ev.cpu_parent
        while parent is not None:
            if parent.name.startswith(("aten::", "ops::")):
                break  # nested inside another op: not top-level
            if parent.name.startswith("layer::"):
                layer = int(parent.name.split("::")[1])
                break
            parent = parent.cpu_parent
        if layer is not None:
            counts[layer] += 1
            launching[layer] += ev.name not in VIEW_OPS and not _noop_cast(ev)
    return dict(sorted(counts.items())), dict(sorted(launching.items()))


@dataclass
class Launches:
    """Estimated CUDA kernel launches of one step: per layer, per layer and kernel (`triton:<kernel>`
    or the aten op), outside the layers (step metadata, embedding, head), and a graph replay's own."""

    per_layer: dict[int, int] = field(default_factory=dict)
    by_kernel: dict[int, Counter[str]] = field(default_factory=dict)
    outside: int = 0
    graph_replay: int = 0

    @property
    def total(self) -> int:
        return sum(self.per_layer.values()) + self.outside + self.graph_replay

    def add(self, layer: int | None, name: str, n: int) -> None:
        if layer is None:
            self.outside += n
        else:
            self.per_layer[layer] = self.per_layer.get(layer, 0) + n
            self.by_kernel.setdefault(layer, Counter())[name] += n


class _AtenLaunches(TorchDispatchMode):
    """Counts the aten ops that launch CUDA kernels, outside Triton launches (the interpreter's own
    torch calls); composite ops (`to`, `linear`, `einsum`...) counted as what they decompose into, as
    on CUDA; `mm(..., out_dtype=)`, which has no CPU kernel, computed as the upcast GEMM."""

    def __init__(self, count: Callable[[str, int], None], in_triton: list[bool]):
        super().__init__()
        self.count, self.in_triton = count, in_triton

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            with self:  # inference mode skips autograd, where these decompose otherwise
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        name = func._schema.name
        if not self.in_triton[0] and name not in NO_LAUNCH_OPS:
            self.count(name, CUDA_KERNELS_PER_OP.get(name, 1))
        if func is torch.ops.aten.mm.dtype and not args[0].is_cuda:
            return torch.mm(args[0].float(), args[1].float()).to(args[2])
        return func(*args, **kwargs)


@contextmanager
def _interpreted_triton() -> Iterator[None]:
    """`V4D_KERNELS=triton` meanwhile, CPU tensors in the Triton interpreter. Triton reads
    TRITON_INTERPRET as its `@jit` functions are defined (its own library's at import), so a process
    that imported triton without it (torch's compiler does) cannot switch."""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("cuda_launches needs TRITON_INTERPRET=1 set before triton is first imported")
    os.environ["TRITON_INTERPRET"] = "1"
    before = os.environ.get("V4D_KERNELS")
    os.environ["V4D_KERNELS"] = "triton"
    try:
        yield
    finally:
        if before is None:
            del os.environ["V4D_KERNELS"]
        else:
            os.environ["V4D_KERNELS"] = before


def cuda_launches(model: torch.nn.Module, run: Callable[[], Any], sms: int = 132, graphs: bool = True) -> Launches:
    """Estimated CUDA kernels of the step `run()` runs on `model` (CPU tensors), per block of the
    model: the Triton path in the interpreter with the launch decisions of a GPU with `sms`
    multiprocessors and the CUDA path's fp32-output GEMMs; `graphs`: the step is a graph replay."""
    with _interpreted_triton():
        from triton.runtime.interpreter import InterpretedFunction

        from v4d.kernels.launch import as_on_gpu

        est = Launches(graph_replay=GRAPH_REPLAY_LAUNCHES if graphs else 0)
        layer: list[int | None] = [None]
        in_triton = [False]
        launch = InterpretedFunction.run

        def counted_launch(self, *args, grid, warmup, **kw):
            if not warmup:
                est.add(layer[0], f"triton:{self.fn.__name__}", 1)
            in_triton[0] = True
            try:
                return launch(self, *args, grid=grid, warmup=warmup, **kw)
            finally:
                in_triton[0] = False

        def enter(block, _args):
            layer[0] = block.layer

        def leave(_block, _args, _out):
            layer[0] = None

        hooks = (b.register_forward_pre_hook(enter) for b in model.layers)
        handles = [*hooks, *(b.register_forward_hook(leave) for b in model.layers)]
        added = "cpu" not in linear.MM_OUT_DTYPE_DEVICES
        linear.MM_OUT_DTYPE_DEVICES.add("cpu")
        InterpretedFunction.run = counted_launch
        try:
            with as_on_gpu(sms), _AtenLaunches(lambda name, n: est.add(layer[0], name, n), in_triton):
                run()
        finally:
            InterpretedFunction.run = launch
            if added:
                linear.MM_OUT_DTYPE_DEVICES.discard("cpu")
            for h in handles:
                h.remove()
    est.per_layer = dict(sorted(est.per_layer.items()))
    return est


def decode_step_launches(
    model: torch.nn.Module, batch: int, context: int | None = None, sms: int = 132, graphs: bool = True
) -> Launches:
    """`cuda_launches` of a static decode step (the one `DecodeGraphs` captures) of `batch` sequences
    at `context` tokens (default: enough closed CSA blocks for a full top-k) on a deployed-format
    cache. The model's parameters set the dtypes: a bf16 model launches what a deployed bf16 model
    does (its fp32 upcasts included). The cache holds zeros: launches do not depend on values."""
    cfg = model.cfg
    context = context or 4 * (cfg.index_topk + 1) + cfg.sliding_window
    pages = sizing.pages_for(cfg, context + 1)
    kv = KVCache(cfg, batch * pages + 1, batch + 1, device=model.embed.weight.device, fmt="deployed")
    seqs = [SeqCache(b, list(range(b * pages, (b + 1) * pages)), context) for b in range(batch)]
    step = DecodeGraphs(model, kv, pages, scratch_slot=batch, scratch_page=batch * pages, use_graphs=False)
    inputs, table = step.inputs([(torch.zeros(1, dtype=torch.long), s) for s in seqs])
    with torch.inference_mode():
        step.forward(inputs, table)  # warm-up: per-device caches (stacked experts, ...) made once
        return cuda_launches(model, lambda: step.forward(inputs, table), sms, graphs)
