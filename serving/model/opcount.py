"""Work per layer of one forward step, counted with the CPU profiler (bench/decode.py and tests).

A layer's count is the number of top-level torch ops its forward dispatches, where each call of a
`v4d.kernels.ops` function counts as one (on a GPU it is one Triton launch; its torch reference
is an implementation detail). The step's metadata is built once, outside the layers, and is
reported apart. On CUDA every op is one launch or less (views launch none), so the count bounds
the launches per layer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from v4d.kernels import ops

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
OP_NAMES = (
    "paged_sparse_attention",
    "paged_indexer_scores",
    "indexer_topk",
    "gated_pool_indexed",
    "moe_experts",
    "hc_mixes",
    "hc_split_sinkhorn",
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
