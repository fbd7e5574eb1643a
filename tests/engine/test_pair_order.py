"""The pair protocol under the ordering of NCCL/HCCL pairs, without accelerators: two gloo groups
in this process, each end wrapped so that its operations run one at a time in issue order (what
NCCL and HCCL do with a pair's point-to-point operations on one stream). The ordered protocol
answers every call, with two tags at once and calls over one chunk; the unordered (gloo) protocol
under the same ordering stalls, which is why device pairs cannot use it."""

from __future__ import annotations

import datetime
import queue
import threading

import pytest
import torch
import torch.distributed as dist

from v4d.serving.runtime.channels import CHUNK, TAGS, EngineChannel, serve_tag

TIMEOUT = datetime.timedelta(seconds=5)


class _Done(threading.Event):
    error: BaseException | None = None

    def wait(self, timeout: datetime.timedelta | float | None = None) -> bool:
        secs = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else timeout
        if not super().wait(secs):
            raise TimeoutError("operation still queued behind an earlier one")
        if self.error is not None:
            raise self.error
        return True


class InOrder:
    """A group whose sends and receives run one after another in the order they were issued."""

    def __init__(self, pg: dist.ProcessGroup):
        self.pg, self.ops = pg, queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            op, args, done = self.ops.get()
            try:
                getattr(self.pg, op)(*args).wait()
            except Exception as e:  # noqa: BLE001 - handed to whoever waits on it
                done.error = e
            done.set()

    def send(self, tensors, peer, tag) -> _Done:
        return self._issue("send", tensors, peer, tag)

    def recv(self, tensors, peer, tag) -> _Done:
        return self._issue("recv", tensors, peer, tag)

    def _issue(self, op, *args) -> _Done:
        done = _Done()
        self.ops.put((op, args, done))
        return done


def gloo_pairs(n: int) -> list[tuple[dist.ProcessGroup, dist.ProcessGroup]]:
    """`n` two-rank gloo groups inside this process: (rank 0, rank 1) each."""
    out = []
    for _ in range(n):
        store, ends = dist.HashStore(), {}

        def make(rank: int, store=store, ends=ends) -> None:
            opts = dist.ProcessGroupGloo._Options()
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
            opts._timeout = TIMEOUT
            ends[rank] = dist.ProcessGroupGloo(store, rank, 2, opts)

        t = threading.Thread(target=make, args=(1,))
        t.start()
        make(0)
        t.join()
        out.append((ends[0], ends[1]))
    return out


def compute(layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * 2 + layer + ids.sum(1, keepdim=True) + w.sum(1, keepdim=True)


def channel_and_shard(in_order: bool) -> tuple[EngineChannel, threading.Event]:
    """An engine channel over ordered groups, one per tag, and the shard's serving threads."""
    groups = [(InOrder(a), InOrder(b)) for a, b in gloo_pairs(TAGS)]
    stopped = threading.Event()
    for tag, (_, shard_end) in enumerate(groups):
        args = (shard_end, tag, torch.device("cpu"), compute, stopped, in_order, "s")
        threading.Thread(target=serve_tag, args=args, daemon=True).start()
    ch = EngineChannel([e for e, _ in groups], "s", "s/0", TIMEOUT.total_seconds())
    ch.ordered = in_order
    return ch, stopped


def call(ch: EngineChannel, tag: int, layer: int, tokens: int, d: int = 64) -> None:
    g = torch.Generator().manual_seed(tokens + tag)
    x, ids, w = torch.randn(tokens, d, generator=g), torch.randint(0, 8, (tokens, 2)), torch.rand(tokens, 2)
    out = ch.receive(tag, ch.send(tag, layer, x, ids, w))
    torch.testing.assert_close(out, compute(layer, x, ids.float(), w))


def test_ordered_protocol_answers_every_call_under_in_order_groups():
    ch, stopped = channel_and_shard(in_order=True)
    big = CHUNK // 64 + 5  # over one chunk
    errors: list[BaseException] = []

    def run(tag: int) -> None:
        try:
            for i in range(10):
                call(ch, tag, i, (1, 16, big)[i % 3])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(tag,)) for tag in range(TAGS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    ch.close()
    stopped.set()


def test_unordered_protocol_stalls_under_in_order_groups():
    """The gloo protocol posts the reply's receive before the sends (and the shard a standing
    receive before its reply): on an in-order stream each waits behind an operation that needs the
    other end to move first."""
    ch, stopped = channel_and_shard(in_order=False)
    with pytest.raises(TimeoutError):
        call(ch, 0, 0, 16)
    stopped.set()
