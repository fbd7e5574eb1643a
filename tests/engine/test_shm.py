"""Same-host pairs over shared memory (serving/runtime/shm.py), both ends without Ray: the engine's
end here, the shard's end in a thread or in another process. Calls of any size (the data region
grows), nothing left in /dev/shm once paired, a failing compute and a dead shard reported at once."""

import multiprocessing as mp
import os
import threading
import time
import uuid

import pytest
import torch

from v4d.serving.runtime.shm import SHM_DIR, SLICE_S, ShardTag, ShmEngineChannel, host_identity

D, K = 32, 2


def scaled(layer, x, ids, w):
    return x * (layer + 1) + ids.sum(1, keepdim=True) + w.sum(1, keepdim=True)


def call(t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, D, generator=g), torch.randint(0, 8, (t, K), generator=g), torch.rand(t, K, generator=g)


def leftovers(base: str) -> list[str]:
    return sorted(p.name for p in SHM_DIR.glob(f"{base}-*"))


def pair(compute, tags: int = 2) -> tuple[str, ShmEngineChannel, threading.Event]:
    base = f"v4d-test-{uuid.uuid4().hex}"
    ch = ShmEngineChannel(base, "s", "s/1", timeout_s=5.0, tags=tags)
    stopped = threading.Event()
    for t in range(tags):
        end = ShardTag(base, t)
        threading.Thread(target=end.serve, args=(compute, stopped, lambda e: None), daemon=True).start()
    ch.joined(5.0)
    return base, ch, stopped


def test_host_identity_is_this_kernel_and_namespaces():
    assert host_identity() and host_identity() == host_identity()
    assert host_identity().startswith(open("/proc/sys/kernel/random/boot_id").read().strip())


@pytest.mark.parametrize("tokens", [1, 16, 3000])  # 3000 x (2x32 + 4) floats: past the first region
def test_calls_on_both_tags_equal_the_compute_and_leave_no_files(tokens):
    base, ch, stopped = pair(scaled)
    assert leftovers(base) == []  # unlinked once the shard opened them
    try:
        for layer in range(3):
            for tag in (0, 1):
                x, ids, w = call(tokens, seed=layer * 2 + tag)
                y = ch.receive(tag, ch.send(tag, layer, x, ids, w))
                torch.testing.assert_close(y, scaled(layer, x, ids.float(), w))
        assert leftovers(base) == []  # a grown region's name too, once its call is answered
        assert not ch.dead
    finally:
        ch.close()
        stopped.set()


def test_a_failing_compute_is_reported_at_once():
    def broken(layer, x, ids, w):
        raise ValueError("bad slot")

    _, ch, stopped = pair(broken, tags=1)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="failed on this call"):
        ch.receive(0, ch.send(0, 0, *call(4)))
    assert time.monotonic() - t0 < 1.0 and ch.dead  # not the 5 s timeout; the pair is not reused
    ch.close()
    stopped.set()


def _shard_process(base: str, ready) -> None:
    end = ShardTag(base, 0)
    ready.set()
    end.serve(scaled, threading.Event(), lambda e: None)


def test_a_dead_shard_process_is_noticed_within_a_slice():
    base = f"v4d-test-{uuid.uuid4().hex}"
    ch = ShmEngineChannel(base, "s", "s/1", timeout_s=30.0, tags=1)
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_shard_process, args=(base, ready), daemon=True)
    proc.start()
    ch.joined(60.0)
    x, ids, w = call(8)
    torch.testing.assert_close(ch.receive(0, ch.send(0, 1, x, ids, w)), scaled(1, x, ids.float(), w))
    os.kill(proc.pid, 9)
    proc.join(10)
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=f"peer process {proc.pid} is gone"):
        ch.receive(0, ch.send(0, 1, x, ids, w))
    assert time.monotonic() - t0 < 10 * SLICE_S  # not the 30 s timeout
    ch.close()
    assert leftovers(base) == []
