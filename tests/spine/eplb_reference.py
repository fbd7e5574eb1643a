"""An independent, straightforward implementation of the EPLB global policy (docs/deepseek-v4.md §7.6).

Plain Python, one layer at a time, written from the sheet's description and not from
`v4d.operator.eplb`: the tests and `bench/plan.py` measure the planner against it.
"""

from __future__ import annotations


def reference_layer(load: list[float], slots: list[int], weight: list[float]) -> list[float]:
    """Expected load on each device for one MoE layer."""
    n_experts, n_physical = len(load), sum(slots)
    copies = [1] * n_experts
    for _ in range(n_physical - n_experts):  # replication: most load per copy gets one more copy
        hot = max(range(n_experts), key=lambda e: load[e] / copies[e])
        copies[hot] += 1
    items = sorted((load[e] / copies[e] for e in range(n_experts) for _ in range(copies[e])), reverse=True)
    dev_load, dev_items = [0.0] * len(slots), [0] * len(slots)
    for w in items:  # balanced packing: least loaded (per capacity) device that still has a free slot
        d = min((i for i in range(len(slots)) if dev_items[i] < slots[i]), key=lambda i: dev_load[i] / weight[i])
        dev_load[d] += w
        dev_items[d] += 1
    return dev_load


def reference_max_over_mean(loads: list[list[float]], slots: list[int], weight: list[float] | None = None) -> float:
    """Worst layer's max over capacity-weighted mean of device load / weight."""
    weight = list(slots) if weight is None else weight
    worst = 1.0
    for layer in loads:
        dev = reference_layer(layer, slots, weight)
        mean = sum(dev) / sum(weight)
        if mean > 0:
            worst = max(worst, max(d / w for d, w in zip(dev, weight, strict=True)) / mean)
    return worst


def zipf_loads(n_layers: int, n_experts: int, s: float, seed: int) -> list[list[float]]:
    """Token counts per (layer, expert) with Zipf(s)-skewed popularity, a different expert order per layer."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base = 1.0 / np.arange(1, n_experts + 1) ** s
    return [(rng.permutation(base) * 1e6).round().tolist() for _ in range(n_layers)]
