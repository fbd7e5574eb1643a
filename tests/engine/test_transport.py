"""RemoteExperts over in-process shards: same numbers as all experts in one place, balancing, failures."""

import pytest
import torch
from helpers.experts import CFG, D, E, all_experts, expert_tensors

from v4d.serving.engine.transport import InProcessTransport, RemoteExperts, SlotMap
from v4d.serving.errors import ShardUnavailable
from v4d.serving.experts import ShardExperts

LAYERS = CFG.num_hidden_layers + CFG.num_nextn_predict_layers


@pytest.fixture(scope="module")
def tensors():
    return expert_tensors(LAYERS)


def shards_of(slots_by_shard):
    return [{"name": n, "slots": [list(s) for _ in range(LAYERS)]} for n, s in slots_by_shard.items()]


def batch(t=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(t)])
    ids[0, 1] = -1  # a masked pair
    w = torch.rand(t, 2, generator=g)
    return x, ids, w


# experts 0..3 have a second copy on shard "c"
LAYOUT = {"a": range(0, 8), "b": range(8, 16), "c": [0, 1, 2, 3]}


def backend(tensors, layout=LAYOUT, broken=()):
    plan_shards = shards_of(layout)
    cores = {s["name"]: ShardExperts(CFG, s["slots"], tensors) for s in plan_shards}
    for name in broken:
        cores[name].compute = lambda *a, _n=name: (_ for _ in ()).throw(ConnectionError(f"{_n} is down"))
    return RemoteExperts(SlotMap.from_shards(plan_shards), InProcessTransport(cores))


@pytest.mark.parametrize("layer", [0, 3, LAYERS - 1])
def test_remote_equals_all_experts_in_one_place(tensors, layer):
    x, ids, w = batch()
    y = backend(tensors)(layer, x, ids, w)
    torch.testing.assert_close(y, all_experts(tensors, layer, x, ids, w), rtol=1e-5, atol=1e-5)


def test_redundant_copies_share_the_load(tensors):
    x = torch.randn(40, D)
    ids = torch.zeros(40, 2, dtype=torch.long)  # every token to expert 0, twice -> 80 pairs, 2 copies
    ids[:, 1] = 9
    w = torch.rand(40, 2)
    be = backend(tensors)
    y = be(0, x, ids, w)
    torch.testing.assert_close(y, all_experts(tensors, 0, x, ids, w), rtol=1e-5, atol=1e-5)
    assert be.load["b"] == 40 and be.load["a"] + be.load["c"] == 40 and abs(be.load["a"] - be.load["c"]) <= 1
    assert be.balance() == pytest.approx(40 / (80 / 3))


def test_failed_shard_is_retried_on_redundant_copies(tensors):
    x, ids, w = batch()
    ids = ids % 4  # only experts 0..3, all of which also live on "c"
    be = backend(tensors, broken=("a",))
    y = be(2, x, ids, w)
    torch.testing.assert_close(y, all_experts(tensors, 2, x, ids, w), rtol=1e-5, atol=1e-5)
    assert be.load["a"] == 0 and "a" in be.failed_at


def test_shard_unavailable_when_no_copy_is_left(tensors):
    x, ids, w = batch()
    with pytest.raises(ShardUnavailable, match="no live copy of expert"):
        backend(tensors, broken=("b",))(1, x, ids, w)


def test_shard_refuses_slot_ids_it_does_not_hold(tensors):
    """An engine whose slot map differs from the shard's (a rollout in between) gets an error, not
    rows silently missing the experts it asked for; a layer the shard lacks likewise."""
    shard = ShardExperts(CFG, [list(range(4)) for _ in range(LAYERS)], tensors)
    x, ids, w = batch(t=6)
    with pytest.raises(ValueError, match="layer 1 has 4 slots here, got id"):
        shard.compute(1, x, ids.clamp(max=5), w)
    assert shard.compute(1, x, ids % 4, w).shape == x.shape
    with pytest.raises(ValueError, match="holds no experts"):
        shard.compute(LAYERS + 5, x, ids % 4, w)
