"""Expert-parallel load balancing: the EPLB global policy (deepseek-v4.md §7.6), for mixed devices.

V4 has no expert groups and no node-limited routing, so the global policy applies: replicate the
most loaded experts into the redundant slots, then pack every layer's physical copies onto the
devices. Devices may differ (an H200 next to an Ascend 910): device i has `slots[i]` slots per
layer and a capacity weight `weight[i]`, and packing balances load / weight instead of load.
A final swap pass lowers the most loaded device where a pairwise exchange helps, so the result is
never worse than plain greedy packing. Vectorised over layers with numpy: V4-Pro (61 x 384 experts,
64+ devices) plans in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SWAP_ROUNDS = 16  # improving exchanges per layer after greedy packing (each round is all layers at once)


@dataclass
class Placement:
    phy2log: np.ndarray  # [L, R] logical expert of each physical slot
    logcnt: np.ndarray  # [L, E] copies of each logical expert
    device: np.ndarray  # [L, R] device holding each physical slot
    device_load: np.ndarray  # [L, D] expected load on each device

    def device_experts(self, layer: int, device: int) -> list[int]:
        """Logical experts on `device` in `layer`, in slot order (ascending expert id)."""
        return sorted(int(e) for e in self.phy2log[layer][self.device[layer] == device])


def replicate(load: np.ndarray, n_physical: int) -> tuple[np.ndarray, np.ndarray]:
    """Primitive 2: one copy each, then each extra copy to the expert with the largest load per copy."""
    n_layers, n_logical = load.shape
    phy2log = np.empty((n_layers, n_physical), dtype=np.int64)
    phy2log[:, :n_logical] = np.arange(n_logical)
    logcnt = np.ones((n_layers, n_logical), dtype=np.int64)
    rows = np.arange(n_layers)
    for i in range(n_logical, n_physical):
        hot = np.argmax(load / logcnt, axis=1)
        phy2log[:, i] = hot
        logcnt[rows, hot] += 1
    return phy2log, logcnt


def pack(item_load: np.ndarray, slots: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Primitive 1, weighted: heaviest item first into the non-full device of least load / weight.

    item_load [L, R], slots [D] (sum R), weight [D] > 0 -> device [L, R].
    """
    n_layers, n_items = item_load.shape
    order = np.argsort(-item_load, axis=1, kind="stable")
    rows = np.arange(n_layers)
    dev_load = np.zeros((n_layers, len(slots)))
    dev_count = np.zeros((n_layers, len(slots)), dtype=np.int64)
    device = np.empty((n_layers, n_items), dtype=np.int64)
    for k in range(n_items):
        item = order[:, k]
        score = np.where(dev_count < slots, dev_load / weight, np.inf)
        best = np.argmin(score, axis=1)
        device[rows, item] = best
        dev_load[rows, best] += item_load[rows, item]
        dev_count[rows, best] += 1
    return device


def _improve(item_load: np.ndarray, device: np.ndarray, slots: np.ndarray, weight: np.ndarray) -> None:
    """Per layer, swap one item of the most loaded device with one elsewhere while that lowers the max.

    All layers at once: mine [L, S] are the top device's items (padded), delta [L, S, R] the load
    moved onto it by exchanging item a for item b.
    """
    n_layers, n_items = item_load.shape
    rows = np.arange(n_layers)
    width = int(slots.max())
    for _ in range(SWAP_ROUNDS):
        load = np.zeros((n_layers, len(weight)))
        np.add.at(load, (rows[:, None], device), item_load)
        norm = load / weight
        top = np.argmax(norm, axis=1)
        on_top = device == top[:, None]
        mine = np.argsort(~on_top, axis=1, kind="stable")[:, :width]
        mine_ok = on_top[rows[:, None], mine]
        delta = item_load[:, None, :] - item_load[rows[:, None], mine][:, :, None]
        new_top = (load[rows, top][:, None, None] + delta) / weight[top][:, None, None]
        new_dst = (load[rows[:, None], device][:, None, :] - delta) / weight[device][:, None, :]
        worst = np.maximum(new_top, new_dst)
        worst[~mine_ok[:, :, None] | on_top[:, None, :]] = np.inf
        flat = worst.reshape(n_layers, -1).argmin(axis=1)
        a, b = np.divmod(flat, n_items)
        gain = worst[rows, a, b] < norm[rows, top] * (1 - 1e-12)
        if not gain.any():
            return
        lay, ia, ib = rows[gain], mine[rows, a][gain], b[gain]
        device[lay, ia], device[lay, ib] = device[lay, ib], top[gain]


def place(load: np.ndarray, slots: list[int] | np.ndarray, weight: list[float] | np.ndarray | None = None) -> Placement:
    """Global EPLB policy: load [L, E] (token counts or rates), slots[d] per layer on device d."""
    load = np.asarray(load, dtype=np.float64)
    slots = np.asarray(slots, dtype=np.int64)
    weight = np.asarray(slots if weight is None else weight, dtype=np.float64)
    n_layers, n_logical = load.shape
    n_physical = int(slots.sum())
    if n_physical < n_logical:
        raise ValueError(f"{n_physical} slots cannot hold {n_logical} experts")
    phy2log, logcnt = replicate(load, n_physical)
    rows = np.arange(n_layers)[:, None]
    item_load = load[rows, phy2log] / logcnt[rows, phy2log]
    device = pack(item_load, slots, weight)
    _improve(item_load, device, slots, weight)
    device_load = np.zeros((n_layers, len(slots)))
    np.add.at(device_load, (np.arange(n_layers)[:, None], device), item_load)
    return Placement(phy2log, logcnt, device, device_load)


def max_over_mean(device_load: np.ndarray, weight: np.ndarray | list[float]) -> float:
    """Worst layer's max over mean of device load / capacity weight (1.0 is perfect)."""
    norm = np.asarray(device_load, dtype=np.float64) / np.asarray(weight, dtype=np.float64)
    mean = norm.mean(axis=1)
    ratio = np.divide(norm.max(axis=1), mean, out=np.ones_like(mean), where=mean > 0)
    return float(ratio.max())
