"""ChannelTransport over real processes: shard replicas as Ray actors with a `ShardEndpoint`, paired
with this process through the rendezvous actor, over shared memory (same host, the default) and over
gloo (V4D_SHM_PAIRS=0, as between hosts). Same numbers as all experts in one place, two micro-batch
tags at once, a replica joining, a replica killed (retried on another replica or a redundant copy),
ShardUnavailable when no copy is left."""

import os
import threading
import time
import uuid
from pathlib import Path

import pytest
import ray
import torch
from helpers.experts import CFG, D, E, all_experts, expert_tensors

from v4d.serving.engine.transport import ChannelTransport, RemoteExperts, SlotMap
from v4d.serving.errors import ShardUnavailable
from v4d.serving.experts import ShardExperts
from v4d.serving.runtime.channels import ShardEndpoint, rendezvous, set_tag
from v4d.serving.runtime.shm import SHM_PAIRS_ENV

LAYERS = 2  # slots for MoE layers 0 and 1 only
LAYOUT = {"a": list(range(0, 8)), "b": list(range(8, 16)), "c": [0, 1, 2, 3]}  # 0..3 also on c

pytestmark = pytest.mark.ray


@ray.remote(num_cpus=0)
class ShardReplica:
    def __init__(self, rdv: str, shard: str, slots: list[list[int]], tensors: dict):
        torch.set_num_threads(1)
        self.endpoint = ShardEndpoint(rendezvous(rdv), shard, ShardExperts(CFG, slots, tensors).compute)

    def replica(self) -> str:
        return self.endpoint.replica

    def pid(self) -> int:
        return os.getpid()


def kill(actor) -> None:
    """Kill a replica and return once its process is gone (ray.kill returns before it exits)."""
    pid = ray.get(actor.pid.remote())
    ray.kill(actor)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, f"replica process {pid} still running"
        time.sleep(0.05)


def batch(t, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(t)])
    return x, ids, torch.rand(t, 2, generator=g)


@pytest.fixture(scope="module", params=["shm", "gloo"])
def world(request, serve_instance):
    """The shards and a transport paired with them over `request.param` (tests name the backends they
    need with indirect parametrisation; both by default)."""
    torch.set_num_threads(1)
    backend = request.param
    saved = os.environ.get(SHM_PAIRS_ENV)
    os.environ[SHM_PAIRS_ENV] = "1" if backend == "shm" else "0"  # read by every pairing of this engine
    rdv = f"test-rdv-{uuid.uuid4().hex[:8]}"
    tensors = expert_tensors(LAYERS)
    slots = {n: [list(s)] * LAYERS for n, s in LAYOUT.items()}
    actors = {n: [ShardReplica.remote(rdv, n, s, tensors)] for n, s in slots.items()}
    ray.get([a[0].replica.remote() for a in actors.values()])
    transport = ChannelTransport(rendezvous(rdv), timeout_s=5.0, refresh_s=0.2)
    assert transport.ready(list(LAYOUT), timeout_s=60)
    assert {c.backend for cs in transport.channels.values() for c in cs} == {backend}
    plan_shards = [{"name": n, "slots": s} for n, s in slots.items()]
    yield rdv, tensors, slots, actors, transport, RemoteExperts(SlotMap.from_shards(plan_shards), transport)
    transport.close()
    for reps in actors.values():
        for a in reps:
            ray.kill(a)
    ray.kill(rendezvous(rdv))
    if saved is None:
        os.environ.pop(SHM_PAIRS_ENV)
    else:
        os.environ[SHM_PAIRS_ENV] = saved


@pytest.mark.parametrize("tokens", [1, 16, 64, 600])  # 600: over one 64 Ki-float chunk
def test_channels_equal_all_experts_in_one_place(world, tokens):
    _, tensors, _, _, _, remote = world
    for layer in range(LAYERS):
        x, ids, w = batch(tokens, seed=layer)
        torch.testing.assert_close(
            remote(layer, x, ids, w), all_experts(tensors, layer, x, ids, w), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("world", ["gloo"], indirect=True)
@pytest.mark.parametrize("tokens", [16, 600])
def test_whole_chunk_calls_of_ordered_pairs_give_the_same_numbers(world, tokens):
    """Ordered (NCCL/HCCL) pairs send before posting the reply's receive and send whole chunks
    (their receives must match the sent size): the same calls that way over these gloo pairs (no
    accelerators here; tests/engine/test_pair_order.py covers the in-order execution)."""
    _, tensors, _, _, transport, remote = world
    chans = [c for cs in transport.channels.values() for c in cs]
    assert chans and all(c.backend == "gloo" and not c.ordered for c in chans)
    try:
        for c in chans:
            c.ordered = True
        x, ids, w = batch(tokens, seed=3)
        torch.testing.assert_close(remote(0, x, ids, w), all_experts(tensors, 0, x, ids, w), rtol=1e-5, atol=1e-5)
    finally:
        for c in chans:
            c.ordered = False


def test_two_micro_batches_in_flight_at_once(world):
    _, tensors, _, _, _, remote = world
    inputs = [batch(8, seed=10 + i) for i in range(2)]
    out = [None, None]

    def run(i):
        set_tag(i)
        out[i] = [remote(1, *inputs[i]) for _ in range(20)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(2):
        for y in out[i]:
            torch.testing.assert_close(y, all_experts(tensors, 1, *inputs[i]), rtol=1e-5, atol=1e-5)


def test_membership_changes_re_form_channels(world):
    """A second replica of shard a joins and takes calls; killing either replica loses no call."""
    rdv, tensors, slots, actors, transport, remote = world
    extra = ShardReplica.remote(rdv, "a", slots["a"], tensors)
    actors["a"].append(extra)
    ray.get(extra.replica.remote())
    deadline = time.monotonic() + 60
    while len(transport._live("a")) < 2:
        assert time.monotonic() < deadline, "the new replica was never paired"
        time.sleep(0.1)
    x, ids, w = batch(16, seed=3)
    ids = ids % 8  # shard a's experts (0..3 also on c)
    kill(actors["a"].pop(0))
    for _ in range(4):  # every call completes: on the surviving replica of a, or on c
        torch.testing.assert_close(remote(0, x, ids, w), all_experts(tensors, 0, x, ids, w), rtol=1e-5, atol=1e-5)
    assert len(transport._live("a")) == 1
    deadline = time.monotonic() + 30  # the killed replica stops polling and leaves the membership
    while sum(s == "a" for s in ray.get(rendezvous(rdv).shards.remote()).values()) != 1:
        assert time.monotonic() < deadline, "the killed replica stayed registered"
        time.sleep(0.5)


def test_a_broken_channel_to_a_live_replica_is_re_formed(world):
    _, tensors, _, _, transport, remote = world
    (old,) = transport._live("c")
    old.dead = True  # as after a timeout
    deadline = time.monotonic() + 30
    while not transport._live("c"):
        assert time.monotonic() < deadline, "no new channel to c"
        time.sleep(0.1)
    assert transport._live("c")[0] is not old
    x, ids, w = batch(4)
    ids = ids % 4
    torch.testing.assert_close(remote(1, x, ids, w), all_experts(tensors, 1, x, ids, w), rtol=1e-5, atol=1e-5)


def test_shard_unavailable_when_no_copy_is_left(world):
    _, tensors, _, actors, transport, remote = world
    kill(actors["b"].pop())
    x, ids, w = batch(8)
    ids[:, 0] = 9  # expert 9 lives only on b
    t0 = time.monotonic()
    with pytest.raises(ShardUnavailable, match="no live copy of expert 9"):
        remote(0, x, ids, w)
    assert time.monotonic() - t0 < 10
    ok = ids % 4  # experts 0..3: copies on a and c
    torch.testing.assert_close(remote(0, x, ok, w), all_experts(tensors, 0, x, ok, w), rtol=1e-5, atol=1e-5)


def test_a_transport_pairs_only_with_its_shards(world):
    rdv, *_ = world
    only_c = ChannelTransport(rendezvous(rdv), timeout_s=5.0, refresh_s=0.2, shards=["c"])
    try:
        assert only_c.ready(["c"], timeout_s=60)
        time.sleep(1.0)  # several refreshes: nothing else gets paired
        assert only_c.stats() == {
            "expert_channels": {"c": 1},
            "expert_channel_links": {"c": ["gloo"]},  # what the devices call for: host memory
            "expert_channel_backends": {"c": [os.environ[SHM_PAIRS_ENV] == "1" and "shm" or "gloo"]},
            "expert_fallback_calls": 0,
        }
    finally:
        only_c.close()


def test_a_rendezvous_nobody_polls_removes_itself(serve_instance):
    from v4d.serving.runtime.channels import NAMESPACE, Rendezvous

    r = Rendezvous(gone_s=10)
    t0 = r.last_call
    assert not r.gone(t0 + 9)
    r.shards()  # an engine's poll keeps it
    assert not r.gone(t0 + 9.5) and r.gone(r.last_call + 11)

    name = f"test-gone-{uuid.uuid4().hex[:8]}"
    actor = rendezvous(name, gone_s=1.0)
    ray.get(actor.register.remote("s/1", "s"))
    deadline = time.monotonic() + 30
    while True:  # the app went away (nobody polls): the detached actor ends
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            break
        assert time.monotonic() < deadline, "abandoned rendezvous still alive after 30 s"
        time.sleep(0.2)


def test_long_polls_answer_on_news_and_keep_their_replica(monkeypatch):
    """take_pairs and get wait for news, not for their timeout; a replica blocked in a poll is not
    dropped as stale, one that stopped polling is, and leaving ends its own poll."""
    import asyncio

    from v4d.serving.runtime import channels

    async def run() -> None:
        r = channels.Rendezvous()
        r.register("s/1", "s")
        r.register("s/2", "s")
        t0 = time.monotonic()
        poll = asyncio.create_task(r.take_pairs("s/1", 30.0))
        key = asyncio.create_task(r.get("k", 30.0))
        await asyncio.sleep(0.2)
        monkeypatch.setattr(channels, "STALE_S", 0.1)
        assert r.shards() == {"s/1": "s"}  # s/2 has not polled for 0.2 s; s/1 is waiting in its poll
        r.pair("s/1", "p")
        r.set("k", b"v")
        assert await poll == ["p"] and await key == b"v"
        poll = asyncio.create_task(r.take_pairs("s/1", 30.0))
        await asyncio.sleep(0.05)
        r.unregister("s/1")
        assert await poll is None
        assert time.monotonic() - t0 < 5

    asyncio.run(run())
