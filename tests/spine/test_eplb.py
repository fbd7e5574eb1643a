"""EPLB global policy with capacity weights (docs/deepseek-v4.md §7.6), against an independent reference."""

import numpy as np
import pytest

from v4d.operator import eplb

from .eplb_reference import reference_max_over_mean, zipf_loads

CASES = [
    # (layers, experts, slots per device, label)
    (8, 256, [36] * 8, "flash-8x36"),
    (8, 256, [34] * 8 + [4] * 4, "flash-mixed"),
    (6, 384, [7] * 64, "pro-64x7"),
    (6, 384, [20] * 12 + [9] * 20 + [8] * 2, "pro-h200-ascend"),
    (4, 16, [16, 2], "tiny"),
]


@pytest.mark.parametrize(("n_layers", "n_experts", "slots", "label"), CASES, ids=[c[3] for c in CASES])
@pytest.mark.parametrize("skew", [0.0, 0.8, 1.2])
def test_placement_is_complete_and_at_least_as_balanced_as_reference(n_layers, n_experts, slots, label, skew):
    load = np.array(zipf_loads(n_layers, n_experts, skew, seed=7))
    p = eplb.place(load, slots)
    # Every slot holds a logical expert, every logical expert has at least one copy, slot counts are respected.
    assert p.phy2log.shape == (n_layers, sum(slots))
    for layer in range(n_layers):
        assert set(p.phy2log[layer].tolist()) == set(range(n_experts))
        assert np.bincount(p.device[layer], minlength=len(slots)).tolist() == list(slots)
    slot_map = p.slot_map(slots)
    assert [len(slot_map[d][0]) for d in range(len(slots))] == list(slots)
    assert sorted(e for d in slot_map for e in d[-1]) == sorted(p.phy2log[-1].tolist())
    assert (p.logcnt.sum(axis=1) == sum(slots)).all()
    # Device loads add up to the layer's load.
    assert np.allclose(p.device_load.sum(axis=1), load.sum(axis=1))
    ours = eplb.max_over_mean(p.device_load, slots)
    ref = reference_max_over_mean(load.tolist(), slots)
    assert ours <= ref + 1e-9, (ours, ref)


def test_replication_goes_to_the_hottest_experts():
    load = np.array([[100.0, 10, 10, 10, 10, 10, 10, 10]])
    p = eplb.place(load, [3, 3, 3, 3])  # 12 slots, 4 redundant
    assert p.logcnt[0, 0] == 5  # 100/5 = 20 > 10: the hot expert takes every extra copy
    # 5 copies of 20 and 7 experts of 10 in 4 x 3 slots: the best max is 20+20+10 against a mean of 42.5.
    assert p.device_load[0].max() == 50
    assert eplb.max_over_mean(p.device_load, [3, 3, 3, 3]) == pytest.approx(50 / 42.5)


def test_capacity_weights_shift_load_to_bigger_devices():
    load = np.ones((1, 30))
    p = eplb.place(load, [20, 10])
    assert p.device_load[0].tolist() == [20.0, 10.0]
    assert eplb.max_over_mean(p.device_load, [20, 10]) == 1.0


def test_deterministic():
    load = np.array(zipf_loads(5, 64, 1.0, seed=3))
    a, b = eplb.place(load, [10] * 8), eplb.place(load, [10] * 8)
    assert (a.device == b.device).all() and (a.phy2log == b.phy2log).all()


def test_too_few_slots():
    with pytest.raises(ValueError, match="16 slots cannot hold 32 experts"):
        eplb.place(np.ones((1, 32)), [8, 8])
