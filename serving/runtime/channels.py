"""Direct token channels between attention engines and expert shards (docs/engine.md "Transport").

Each (engine replica, shard replica) pair is a two-rank torch.distributed process group of its own,
created directly (no global `init_process_group`), so replicas join and leave without re-forming
anyone else's group. Rendezvous goes through one named Ray actor (`Rendezvous`): shard replicas
register there, an engine asks it to pair with a replica, and both ends exchange gloo addresses
through its key-value store (`ActorStore`). The gloo device binds V4D_TRANSPORT_HOST (127.0.0.1 for
`v4d serve`) or the Ray node's address, never a wildcard. Rows move through host memory over gloo,
or over shared memory where both ends share a host (`shm.py`, the default there: the pair's id says
`shm` and no process group is made); with V4D_DEVICE_PAIRS=1, a pair whose ends are both CUDA (or
both Ascend) runs NCCL (HCCL) on the devices instead (`pair_backend`; docs/engine.md: built, not yet
run on hardware, so off by default).

Wire format per call, on tag `t` (one tag per micro-batch, so two micro-batches overlap):
engine -> shard one fp32 message [layer, tokens, k, d | tokens x (x | local ids | weights)], cut
into chunks of at most CHUNK floats; shard -> engine fp32 [tokens, d]. Gloo sends a message at once
only if the receiver has already posted its receive (else it first exchanges a ready notice), so
the shard keeps a CHUNK-sized receive posted at all times (two buffers in turn) and the engine posts
its reply receive before sending: a decode call is two messages, no extra round trips. A header with
layer -1 closes the tag.

Device pairs (NCCL, HCCL) are "ordered": their point-to-point operations between two ranks run one
after another on one stream, in the order they were issued, ignore tags, and a receive must match
the sent size. So each tag gets a group of its own, the engine sends before it posts the reply's
receive, the shard posts a receive only when it waits for the next call (a standing receive would
hold back the reply behind it), and every engine -> shard chunk is sent whole (the reply's size is
known to both ends).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from v4d.serving.runtime.device import pair_backend
from v4d.serving.runtime.shm import ShardTag, ShmEngineChannel, host_identity, shm_pairs

log = logging.getLogger(__name__)

NAMESPACE = "v4d"
TAGS = 2  # concurrent calls per pair: one per decode micro-batch
HEADER = 4
CHUNK = 1 << 16  # floats per message (256 KiB): a whole decode call fits one
CLOSE = -1
HOST_ENV = "V4D_TRANSPORT_HOST"
WAIT_S = 2.0  # the longest a long poll (take_pairs, get) waits for news before it answers anyway
STALE_S = 5.0  # a shard replica that has not polled the rendezvous this long is gone (> WAIT_S)
RETRY_S = 1.0  # how long a shard waits after a failed poll (the rendezvous is restarting with the app)
GONE_S = 300.0  # a rendezvous nobody has called this long belongs to an app that went away
IDLE_S = 86400.0  # how long a shard's pair waits for the next call
DEVICE_PAIRS_ENV = "V4D_DEVICE_PAIRS"  # "1": NCCL/HCCL pairs where both ends are on such devices


def device_pairs() -> bool:
    return os.environ.get(DEVICE_PAIRS_ENV, "0") == "1"


class Rendezvous:
    """Named Ray actor (one per plan name): shard membership, pairing requests and a key-value store.
    An async actor: the long polls (`take_pairs`, `get`) wait on its event loop until there is news
    or `wait_s` has passed, so an idle shard costs one call every WAIT_S, not a stream of empty
    polls, and a pair request reaches it at once; every other method returns at once.

    It is detached (it outlives any one replica), so it removes itself once its app is gone: live
    shards poll it back to back and engines every second, so `gone_s` without a call means neither
    is left (`watch`, started by `rendezvous()`). A later deployment of the plan creates a new one."""

    def __init__(self, gone_s: float = GONE_S) -> None:
        self.members: dict[str, str] = {}  # shard replica id -> shard name
        self.pending: dict[str, list[str]] = {}  # shard replica id -> pair ids to join
        self.seen: dict[str, float] = {}  # shard replica id -> its last poll (the end of one under way)
        self.devices: dict[str, str] = {}  # shard replica id -> the torch device type it computes on
        self.hosts: dict[str, str] = {}  # shard replica id -> shm.host_identity() of its process
        self.kv: dict[str, bytes] = {}
        self.gone_s, self.last_call, self.watching = gone_s, time.monotonic(), False
        self.news = asyncio.Event()  # set (and replaced) when a pair is asked for, a key written or a replica leaves

    def gone(self, now: float) -> bool:
        """Nobody has registered, polled or paired for `gone_s`: the app it served has gone away."""
        return now - self.last_call > self.gone_s

    def watch(self) -> None:
        """In the actor: a thread that kills it once `gone` (started once; a no-op when running)."""
        if self.watching:
            return
        self.watching = True
        import ray

        me = ray.get_runtime_context().current_actor

        def loop() -> None:
            while not self.gone(time.monotonic()):
                time.sleep(min(self.gone_s, 10.0))
            log.info("rendezvous unused for %.0f s: its app is gone, removing it", self.gone_s)
            ray.kill(me)

        threading.Thread(target=loop, name="v4d-rendezvous-watch", daemon=True).start()

    def register(self, replica: str, shard: str, device: str = "cpu", host: str = "") -> None:
        self.last_call = time.monotonic()
        self.members[replica] = shard
        self.devices[replica] = device
        self.hosts[replica] = host
        self.pending.setdefault(replica, [])
        self.seen[replica] = time.monotonic()

    def unregister(self, replica: str) -> None:
        for d in (self.members, self.pending, self.seen, self.devices, self.hosts):
            d.pop(replica, None)
        self._tell()  # its own long poll answers None at once

    def shards(self) -> dict[str, str]:
        """Live shard replicas; one that stopped polling (killed, node lost) is dropped."""
        now = self.last_call = time.monotonic()
        for replica in [r for r, t in self.seen.items() if now - t > STALE_S]:
            self.unregister(replica)
        return dict(self.members)

    def pair(self, replica: str, pair: str) -> str | None:
        """Ask `replica` to join `pair`; its device type, or None if it is not registered."""
        self.last_call = time.monotonic()
        if replica not in self.members:
            return None
        self.pending[replica].append(pair)
        self._tell()
        return self.devices[replica]

    def device(self, replica: str) -> str | None:
        """The device type `replica` computes on; None if it is not registered."""
        return self.devices.get(replica)

    def host(self, replica: str) -> str:
        """Where `replica`'s process runs (shm.host_identity(); "" if unknown)."""
        return self.hosts.get(replica, "")

    async def take_pairs(self, replica: str, wait_s: float = 0.0) -> list[str] | None:
        """Pairs to join, waiting up to `wait_s` for one (a long poll); None if `replica` is unknown
        (dropped as stale, or a restarted rendezvous). The replica counts as seen until the poll ends."""
        if not self._polled(replica, wait_s):
            return None
        await self._until(lambda: replica not in self.members or bool(self.pending[replica]), wait_s)
        if not self._polled(replica, 0.0):
            return None
        out, self.pending[replica] = self.pending[replica], []
        return out

    def _polled(self, replica: str, wait_s: float) -> bool:
        """Note a poll that lasts up to `wait_s` (so `shards` keeps a replica blocked in one); False if
        `replica` is not a member."""
        self.last_call = now = time.monotonic()
        if replica not in self.members:
            return False
        self.seen[replica] = max(self.seen[replica], now + wait_s)
        return True

    def set(self, key: str, value: bytes) -> None:
        self.kv[key] = value
        self._tell()

    async def get(self, key: str, wait_s: float = 0.0) -> bytes | None:
        """The value of `key`, waiting up to `wait_s` for it to be written (a long poll)."""
        await self._until(lambda: key in self.kv, wait_s)
        return self.kv.get(key)

    def add(self, key: str, n: int) -> int:
        v = int(self.kv.get(key, b"0")) + n
        self.kv[key] = str(v).encode()
        self._tell()
        return v

    def drop(self, prefix: str) -> None:
        for k in [k for k in self.kv if k.startswith(prefix)]:
            del self.kv[k]

    def _tell(self) -> None:
        """Wake every long poll to look again (there are a few: one per shard replica, one per
        store key being waited for)."""
        self.news.set()
        self.news = asyncio.Event()

    async def _until(self, ready: Callable[[], bool], wait_s: float) -> None:
        """Return once `ready()` or after `wait_s`."""
        deadline = time.monotonic() + wait_s
        while not ready() and (left := deadline - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(self.news.wait(), left)
            except TimeoutError:
                return


def rendezvous_name(deployment: str) -> str:
    """The rendezvous actor of the plan named `deployment` (Plan.name)."""
    return f"v4d-rendezvous-{deployment}"


def rendezvous(name: str, gone_s: float = GONE_S) -> Any:
    """The app's rendezvous actor, created on first use (detached: it outlives any one replica; it
    removes itself `gone_s` after its last caller left)."""
    import ray

    actor = (
        ray.remote(Rendezvous)
        .options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0)
        .remote(gone_s)
    )
    actor.watch.remote()
    return actor


class ActorStore(dist.Store):
    """A c10d Store over the rendezvous actor's key-value store, under `prefix` (one per pair)."""

    def __init__(self, actor: Any, prefix: str, timeout_s: float):
        super().__init__()
        self.actor, self.prefix, self.timeout_s = actor, prefix, timeout_s

    def _call(self, method: str, *args: Any) -> Any:
        import ray

        return ray.get(getattr(self.actor, method).remote(*args), timeout=self.timeout_s)

    def set(self, key: str, value: bytes | str) -> None:
        self._call("set", self.prefix + key, value if isinstance(value, bytes) else value.encode())

    def get(self, key: str) -> bytes:
        import ray

        deadline = time.monotonic() + self.timeout_s
        while (left := deadline - time.monotonic()) > 0:
            wait = min(left, WAIT_S)
            v = ray.get(self.actor.get.remote(self.prefix + key, wait), timeout=self.timeout_s + wait)
            if v is not None:
                return v
        raise TimeoutError(f"rendezvous key {self.prefix + key!r}: peer did not arrive in {self.timeout_s} s")

    def add(self, key: str, n: int) -> int:
        return self._call("add", self.prefix + key, n)

    def check(self, keys: list[str]) -> bool:
        return all(self._call("get", self.prefix + k) is not None for k in keys)

    def wait(self, keys: list[str], timeout: Any = None) -> None:
        for k in keys:
            self.get(k)


def open_pair(store: dist.Store, rank: int, host: str, timeout_s: float, backend: str = "gloo") -> dist.ProcessGroup:
    """A two-rank group (engine rank 0, shard rank 1): gloo, whose device binds `host` only, or NCCL /
    HCCL between the two ends' current devices. `timeout_s` bounds every wait without its own
    timeout (the shard's: an idle pair waits a day for work)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, 2, opts)
    if backend == "hccl":
        import torch_npu  # noqa: F401  (adds ProcessGroupHCCL to torch.distributed)

        return dist.ProcessGroupHCCL(store, rank, 2, timeout)
    opts = dist.ProcessGroupGloo._Options()
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    opts._timeout = timeout
    return dist.ProcessGroupGloo(store, rank, 2, opts)


def ordered(backend: str) -> bool:
    """Whether `backend`'s operations between two ranks run in issue order on one stream (see above)."""
    return backend in ("nccl", "hccl")


def open_groups(
    actor: Any, pair: str, rank: int, timeout_s: float, backend: str, store_timeout_s: float
) -> list[dist.ProcessGroup]:
    """The groups of one pair, one per tag ([one group] * TAGS on gloo, whose tags keep calls apart);
    its rendezvous keys are dropped once both ends have joined."""
    n = TAGS if ordered(backend) else 1
    pgs = [
        open_pair(ActorStore(actor, f"{pair}t{i}/", store_timeout_s), rank, node_address(), timeout_s, backend)
        for i in range(n)
    ]
    release(ActorStore(actor, pair, store_timeout_s), pair)
    return pgs * (TAGS // n)


def pair_device(backend: str, device: str) -> torch.device:
    """Where a pair's buffers live: the replica's current accelerator on NCCL/HCCL pairs, else host memory."""
    return torch.device(device) if backend in ("nccl", "hccl") else torch.device("cpu")


def node_address() -> str:
    """The address gloo binds: V4D_TRANSPORT_HOST (127.0.0.1 for `v4d serve`), else the Ray node's."""
    import ray

    return os.environ.get(HOST_ENV) or ray.util.get_node_ip_address()


# -- the engine end -----------------------------------------------------------------------------
class EngineChannel:
    """Rank 0 of one pair: `send` starts a shard's call for one layer, `receive` waits for its output."""

    def __init__(
        self,
        pgs: list[dist.ProcessGroup],
        shard: str,
        replica: str,
        timeout_s: float,
        link: str = "gloo",
        backend: str = "gloo",
        device: torch.device | None = None,
    ):
        """`pgs`: the pair's group of each tag; `link`: the backend the two ends' devices call for
        (device.pair_backend); `backend`: the one the pair runs (`link` with V4D_DEVICE_PAIRS=1,
        else gloo); `device`: where its buffers live."""
        self.pgs, self.shard, self.replica, self.link, self.backend = pgs, shard, replica, link, backend
        self.device = device or torch.device("cpu")
        self.ordered = ordered(backend)  # tests switch it on over gloo
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.locks = [threading.Lock() for _ in range(TAGS)]
        self.buffers = [torch.empty(CHUNK, device=self.device) for _ in range(TAGS)]
        self.dead = False

    def send(self, tag: int, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> Any:
        """Start a call; returns what `receive` needs. Holds the tag's lock until `receive`."""
        self.locks[tag].acquire()
        try:
            msg, pg = self._message(tag, layer, x, ids, w), self.pgs[tag]
            out = torch.empty(x.shape[0], x.shape[1], device=self.device)
            if self.ordered:  # the reply's receive after the sends: it would hold them back
                sends = [pg.send([part], 1, tag) for part in msg.split(CHUNK)]
                return sends, pg.recv([out], 1, tag), out
            recv = pg.recv([out], 1, tag)
            return [pg.send([part], 1, tag) for part in msg.split(CHUNK)], recv, out
        except BaseException:
            self.dead = True
            self.locks[tag].release()
            raise

    def _message(self, tag: int, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The call written into the tag's own send buffer (reused: `receive` waits for the sends
        before the tag is free again): header through numpy, rows, ids and weights as three copies."""
        n, d = x.shape
        k = ids.shape[1]
        size = HEADER + n * (d + 2 * k)
        sent = -(-size // CHUNK) * CHUNK if self.ordered else size
        if self.buffers[tag].numel() < sent:
            self.buffers[tag] = torch.empty(max(sent, CHUNK), device=self.device)
        msg = self.buffers[tag][:sent]
        if msg.is_cpu:
            msg.numpy()[:HEADER] = (layer, n, k, d)
        else:
            msg[:HEADER].copy_(torch.tensor((layer, n, k, d), dtype=msg.dtype), non_blocking=True)
        body = msg[HEADER:size].view(n, d + 2 * k)
        body[:, :d], body[:, d : d + k], body[:, d + k :] = x, ids, w
        return msg

    def receive(self, tag: int, pending: Any) -> torch.Tensor:
        sends, recv, out = pending
        try:
            for work in (*sends, recv):
                work.wait(self.timeout)
            return out
        except BaseException:
            self.dead = True  # a broken pair is never reused: the engine re-pairs from the rendezvous
            raise
        finally:
            self.locks[tag].release()

    def close(self) -> None:
        if self.dead:
            return
        self.dead = True
        try:
            for tag in range(TAGS):
                with self.locks[tag]:
                    self.pgs[tag].send([close_message(self.ordered, self.device)], 1, tag).wait(self.timeout)
        except Exception:  # noqa: BLE001 - the peer is already gone
            pass


def close_message(whole: bool, device: torch.device) -> torch.Tensor:
    """The header that ends a tag (a whole chunk on ordered pairs)."""
    msg = torch.zeros(CHUNK if whole else HEADER, device=device)
    msg[0] = CLOSE
    return msg


def connect(
    actor: Any, shard: str, replica: str, timeout_s: float, device: str = "cpu"
) -> EngineChannel | ShmEngineChannel:
    """Pair this engine (computing on `device`) with one shard replica (blocks until the shard
    joins, at most `timeout_s`). The pair's backend is decided here and told to the shard in the
    pair's id (`pair/<id>/<backend>/`)."""
    import ray

    shard_device = ray.get(actor.device.remote(replica), timeout=timeout_s)
    if shard_device is None:
        raise ConnectionError(f"shard replica {replica} is no longer registered")
    link = pair_backend(device, shard_device)
    backend = link if device_pairs() else "gloo"
    if link != backend:
        log.info(
            "pair with %s: %s devices, gloo through host memory (%s=1 for %s)", replica, link, DEVICE_PAIRS_ENV, link
        )
    here = host_identity()
    if backend == "gloo" and shm_pairs() and here and ray.get(actor.host.remote(replica), timeout=timeout_s) == here:
        backend = "shm"  # same host: shared memory, no sockets
    pair = f"pair/{uuid.uuid4().hex}/{backend}/"
    # a shm pair's files exist before the shard looks for them
    shm = ShmEngineChannel(shm_base(pair), shard, replica, timeout_s, link, TAGS) if backend == "shm" else None
    try:
        if ray.get(actor.pair.remote(replica, pair), timeout=timeout_s) is None:
            raise ConnectionError(f"shard replica {replica} is no longer registered")
        if shm is not None:
            shm.joined(timeout_s)
            return shm
    except BaseException:
        if shm is not None:
            shm.close()
        raise
    pgs = open_groups(actor, pair, 0, timeout_s, backend, timeout_s)
    return EngineChannel(pgs, shard, replica, timeout_s, link, backend, pair_device(backend, device))


def shm_base(pair: str) -> str:
    """The /dev/shm name prefix of a shm pair (`pair/<id>/shm/`): both ends derive it from the id."""
    return f"v4d-{pair.split('/')[1]}"


def release(store: ActorStore, pair: str) -> None:
    """Drop a pair's rendezvous keys once both ends have joined (the second to finish drops them)."""
    if store.add("joined", 1) == 2:
        store.actor.drop.remote(pair)


# -- the shard end ------------------------------------------------------------------------------
class ShardEndpoint:
    """Rank 1 of every pair with this shard replica: registers it at the rendezvous, joins the pairs
    engines ask for and serves each tag in a thread with `compute(layer, x, local_ids, weights)`."""

    def __init__(
        self,
        actor: Any,
        shard: str,
        compute: Callable[..., torch.Tensor],
        timeout_s: float = 10.0,
        device: str = "cpu",
    ):
        """`device`: the torch device type `compute` runs on (engines pick the pair's link from it)."""
        self.actor, self.shard, self.compute, self.timeout_s, self.device = actor, shard, compute, timeout_s, device
        self.replica = f"{shard}/{uuid.uuid4().hex[:12]}"
        self.stopped = threading.Event()
        self.pairs: list[list[dist.ProcessGroup] | list[ShardTag]] = []
        self.host = host_identity()
        import ray

        ray.get(actor.register.remote(self.replica, shard, device, self.host), timeout=timeout_s)
        threading.Thread(target=self._accept, name=f"v4d-accept-{shard}", daemon=True).start()

    def _accept(self) -> None:
        import ray

        while not self.stopped.is_set():  # long polls back to back: each waits up to WAIT_S for a pair
            try:
                poll = self.actor.take_pairs.remote(self.replica, WAIT_S)
                pairs = ray.get(poll, timeout=self.timeout_s + WAIT_S)
                if pairs is None and not self.stopped.is_set():  # forgotten while it could not poll
                    ray.get(
                        self.actor.register.remote(self.replica, self.shard, self.device, self.host),
                        timeout=self.timeout_s,
                    )
                for pair in pairs or ():
                    threading.Thread(target=self._join, args=(pair,), daemon=True).start()
            except Exception as e:  # noqa: BLE001 - the rendezvous restarts with the app; keep polling
                log.warning("rendezvous poll failed: %r", e)
                self.stopped.wait(RETRY_S)

    def _join(self, pair: str) -> None:
        backend = pair.rstrip("/").rsplit("/", 1)[-1]
        if backend == "shm":
            self._join_shm(pair)
            return
        try:
            pgs = open_groups(self.actor, pair, 1, IDLE_S, backend, self.timeout_s)
        except Exception as e:  # noqa: BLE001 - the engine gave up; it will ask again
            log.warning("pairing %s failed: %r", pair, e)
            return
        self.pairs.append(pgs)
        device = pair_device(backend, self.device)
        for tag, pg in enumerate(pgs):
            args = (pg, tag, device, self.compute, self.stopped, ordered(backend), self.shard)
            threading.Thread(target=serve_tag, args=args, daemon=True).start()

    def _join_shm(self, pair: str) -> None:
        try:
            tags = [ShardTag(shm_base(pair), t) for t in range(TAGS)]
        except Exception as e:  # noqa: BLE001 - the engine gave up and removed the files; it will ask again
            log.warning("pairing %s failed: %r", pair, e)
            return
        self.pairs.append(tags)

        def failed(tag: int) -> Callable[[BaseException], None]:
            return lambda e: log.warning("shard %s: pair closed on tag %d: %r", self.shard, tag, e)

        for tag, t in enumerate(tags):
            args = (self.compute, self.stopped, failed(tag))
            threading.Thread(target=t.serve, args=args, name=f"v4d-shm-{self.shard}-{tag}", daemon=True).start()

    def close(self) -> None:
        self.stopped.set()
        try:
            import ray

            ray.get(self.actor.unregister.remote(self.replica), timeout=self.timeout_s)
        except Exception:  # noqa: BLE001 - shutting down with the cluster
            pass


def serve_tag(
    pg: dist.ProcessGroup,
    tag: int,
    device: torch.device,
    compute: Callable[..., torch.Tensor],
    stopped: threading.Event,
    in_order: bool = False,
    shard: str = "",
) -> None:
    """Answer one pair's calls on `tag` in the calling thread until it is closed. A call that fits
    one chunk is read in place: its buffer is not posted again before the reply is sent, so nothing
    is copied before compute. Unordered (gloo) pairs keep the next receive posted; ordered ones
    (NCCL, HCCL) post it only when waiting for the next call."""
    bufs, turn = [torch.empty(CHUNK, device=device) for _ in range(1 if in_order else 2)], 0
    body = torch.empty(0, device=device)  # calls over one chunk are gathered here
    posted = None if in_order else pg.recv([bufs[0]], 0, tag)

    def next_chunk() -> torch.Tensor:
        nonlocal posted, turn
        if in_order:
            pg.recv([bufs[0]], 0, tag).wait()
            return bufs[0]
        posted.wait()  # no timeout: a pair idles between requests
        got, turn = bufs[turn], turn ^ 1
        posted = pg.recv([bufs[turn]], 0, tag)  # the next chunk's receive is posted before it comes
        return got

    while not stopped.is_set():
        try:
            first = next_chunk()
            layer, n, k, d = (int(v) for v in first[:HEADER].tolist())
            if layer == CLOSE:
                return
            size = n * (d + 2 * k)
            if size <= CHUNK - HEADER:
                rows = first[HEADER : HEADER + size]
            else:
                if body.numel() < size:
                    body = torch.empty(size, device=device)
                have = CHUNK - HEADER
                body[:have] = first[HEADER:]
                while have < size:
                    part = min(CHUNK, size - have)
                    body[have : have + part] = next_chunk()[:part]
                    have += part
                rows = body[:size]
            rows = rows.view(n, d + 2 * k)
            x, ids, w = rows[:, :d], rows[:, d : d + k].long(), rows[:, d + k :]
            pg.send([compute(layer, x, ids, w).float().contiguous()], 0, tag).wait()
        except Exception as e:  # noqa: BLE001 - engine gone or a bad call: this tag's loop ends
            if not stopped.is_set():
                log.warning("shard %s: pair closed on tag %d: %r", shard, tag, e)
            return


_local = threading.local()


def current_tag() -> int:
    """The channel tag of the calling thread's micro-batch (0 unless the runner set one)."""
    return getattr(_local, "tag", 0)


def set_tag(tag: int) -> None:
    if not 0 <= tag < TAGS:
        raise ValueError(f"micro-batch tag: expected 0..{TAGS - 1}, got {tag}")
    _local.tag = tag
