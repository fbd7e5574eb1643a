"""Expert-parallel load balancing: the EPLB global policy (docs/deepseek-v4.md §7.6), for mixed devices.

V4 has no expert groups and no node-limited routing, so the global policy applies: replicate the
most loaded experts into the redundant slots, then pack every layer's physical copies onto the
devices. Devices may differ (an H200 next to an Ascend 910): device i has `slots[i]` slots per
layer and a capacity weight `weight[i]`, and packing balances load / weight instead of load.
A final swap pass lowers the most loaded device where a pairwise exchange helps, so the result is
never worse than plain greedy packing. Vectorised over layers with numpy: V4-Pro (61 x 384 experts,
64+ devices) plans in milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SWAP_ROUNDS = 16  # improving exchanges per layer after greedy packing (each round is all layers at once)


@dataclass
class Placement:
    phy2log: np.ndarray  # [L, R] logical expert of each physical slot
    logcnt: np.ndarray  # [L, E] copies of each logical expert
    device: np.ndarray  # [L, R] device holding each physical slot
    device_load: np.ndarray  # [L, D] expected load on each device

    def slot_map(self, slots: np.ndarray | list[int]) -> list[list[list[int]]]:
        """[device][layer] -> logical experts in slot order (ascending id); one sort for all layers."""
        n_logical = self.logcnt.shape[1]
        keyed = np.sort(self.device * n_logical + self.phy2log, axis=1) % n_logical
        bounds = np.concatenate([[0], np.cumsum(slots)])
        rows = keyed.tolist()
        return [[row[bounds[d] : bounds[d + 1]] for row in rows] for d in range(len(slots))]


def device_loads(item_load: np.ndarray, device: np.ndarray, n_devices: int) -> np.ndarray:
    """[L, D] sum of item loads per device, per layer (one bincount over layer-offset device ids)."""
    n_layers = item_load.shape[0]
    flat = (device + n_devices * np.arange(n_layers)[:, None]).ravel()
    return np.bincount(flat, weights=item_load.ravel(), minlength=n_layers * n_devices).reshape(n_layers, n_devices)


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

    Layers still improving are processed together: mine [L, S] are the top device's items (padded),
    delta [L, S, R] the load moved onto it by exchanging item a for item b.
    """
    n_items = item_load.shape[1]
    width = int(slots.max())
    active = np.arange(item_load.shape[0])
    for _ in range(SWAP_ROUNDS):
        il, dev = item_load[active], device[active]
        rows = np.arange(len(active))
        load = device_loads(il, dev, len(weight))
        norm = load / weight
        top = np.argmax(norm, axis=1)
        on_top = dev == top[:, None]
        mine = np.argsort(~on_top, axis=1, kind="stable")[:, :width]
        mine_ok = on_top[rows[:, None], mine]
        delta = il[:, None, :] - il[rows[:, None], mine][:, :, None]
        new_top = (load[rows, top][:, None, None] + delta) / weight[top][:, None, None]
        new_dst = (load[rows[:, None], dev][:, None, :] - delta) / weight[dev][:, None, :]
        worst = np.maximum(new_top, new_dst)
        worst[~mine_ok[:, :, None] | on_top[:, None, :]] = np.inf
        a, b = np.divmod(worst.reshape(len(active), -1).argmin(axis=1), n_items)
        gain = worst[rows, a, b] < norm[rows, top] * (1 - 1e-12)
        layers = active[gain]
        ia, ib = mine[rows, a][gain], b[gain]
        device[layers, ia], device[layers, ib] = device[layers, ib], top[gain]
        active = layers
        if len(active) == 0:
            return


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
    return Placement(phy2log, logcnt, device, device_loads(item_load, device, len(slots)))


def max_over_mean(device_load: np.ndarray, weight: np.ndarray | Sequence[float]) -> float:
    """Worst layer's max over mean of device load / capacity weight (1.0 is perfect).

    The mean is the capacity-weighted one, total load / total weight: what every device would carry
    per unit of capacity if the layer were perfectly balanced.
    """
    load = np.asarray(device_load, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    mean = load.sum(axis=1) / weight.sum()
    ratio = np.divide((load / weight).max(axis=1), mean, out=np.ones_like(mean), where=mean > 0)
    return float(ratio.max())
