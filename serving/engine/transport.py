"""Routed experts on remote shards: an `ExpertBackend` over the plan's slot map and a transport.

Per MoE layer, `RemoteExperts` maps every (token, logical expert) pair to one physical copy (a shard
and its local slot), splitting an expert's pairs evenly over its redundant copies, least-loaded shard
first. Each shard gets the rows it needs with local ids (-1 where a pair lives elsewhere), computes
its weighted sum, and the partial outputs are added up. The transport is the only part that moves
tensors: `ChannelTransport` sends the rows over direct pair channels (serving/runtime/channels.py),
off Serve's request path; `ServeTransport` calls the shard deployments through Serve handles (the
fallback while a shard has no channel yet). A failed shard's pairs are re-split over the remaining
copies; with none left the step fails with ShardUnavailable.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from v4d.serving.errors import ShardUnavailable
from v4d.serving.runtime.channels import connect, current_tag

log = logging.getLogger(__name__)

Call = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # x [T_s, d], local ids [T_s, k], weights [T_s, k]


Results = dict[str, torch.Tensor | BaseException]


class Transport(Protocol):
    """`dispatch` runs each shard's call concurrently; a shard's value is its output [T_s, d] or the
    error it raised. A transport whose calls travel while the caller computes also has
    `start(layer, calls) -> finish`, where `finish()` waits and returns what `dispatch` would."""

    def dispatch(self, layer: int, calls: Mapping[str, Call]) -> Results: ...


def begin(transport: Transport, layer: int, calls: Mapping[str, Call]) -> Callable[[], Results]:
    start = getattr(transport, "start", None)
    if start is not None:
        return start(layer, calls)
    out = transport.dispatch(layer, calls)
    return lambda: out


@dataclass(frozen=True)
class SlotMap:
    """copies[layer][expert] = ((shard name, local slot), ...) from the plan's shards."""

    shards: tuple[str, ...]
    copies: dict[int, dict[int, tuple[tuple[str, int], ...]]]

    @classmethod
    def from_shards(cls, shards: Sequence[Any]) -> SlotMap:
        """`shards`: plan ShardPlan objects or dicts with `name` and `slots` ([moe_layer][slot] -> expert)."""
        copies: dict[int, dict[int, list[tuple[str, int]]]] = {}
        names = []
        for sh in shards:
            name, slots = (sh["name"], sh["slots"]) if isinstance(sh, dict) else (sh.name, sh.slots)
            names.append(name)
            for layer, experts in enumerate(slots):
                for slot, e in enumerate(experts):
                    copies.setdefault(layer, {}).setdefault(int(e), []).append((name, slot))
        return cls(tuple(names), {la: {e: tuple(c) for e, c in m.items()} for la, m in copies.items()})


class RemoteExperts:
    """`ExpertBackend` (layer, x[T,d], ids[T,k], weights[T,k]) -> y[T,d] over a transport."""

    def __init__(self, slot_map: SlotMap, transport: Transport, suspect_s: float = 10.0):
        self.map, self.transport, self.suspect_s = slot_map, transport, suspect_s
        self.failed_at: dict[str, float] = {}  # shard -> last failure (avoided while alternatives exist)
        self.load = dict.fromkeys(slot_map.shards, 0)  # token-expert pairs served per shard

    def balance(self) -> float:
        """max / mean of the pairs served per shard (1.0 = perfectly even)."""
        mean = sum(self.load.values()) / max(len(self.load), 1)
        return max(self.load.values(), default=0) / mean if mean else 1.0

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.start(layer, x, ids, weights)()

    def start(
        self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> Callable[[], torch.Tensor]:
        """Send the layer's rows; the returned function waits for the shards, fails calls over and
        combines (MoE computes the shared expert in between, as DeepSeek's serving overlaps it with
        dispatch)."""
        y = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        excluded: set[str] = set()

        def send(pairs: torch.Tensor) -> tuple[Any, dict[str, torch.Tensor], Callable[[], Results]]:
            assign = self._assign(layer, ids, pairs, excluded)
            calls, rows = self._calls(x, ids, weights, assign)
            return assign, rows, begin(self.transport, layer, calls)

        pairs = (ids >= 0).flatten().nonzero().flatten()
        sent = send(pairs) if pairs.numel() else None

        def finish() -> torch.Tensor:
            nonlocal sent
            while sent is not None:
                assign, rows, results = sent
                retry = []
                for shard, out in results().items():
                    if isinstance(out, BaseException):
                        log.warning("expert shard %s failed on layer %d: %r", shard, layer, out)
                        self.failed_at[shard] = time.monotonic()
                        excluded.add(shard)
                        retry.append(assign[shard][0])
                    else:
                        y.index_add_(0, rows[shard], out.to(y.device, y.dtype))  # host-memory pairs answer on the CPU
                        self.load[shard] += assign[shard][0].numel()
                sent = send(torch.cat(retry)) if retry else None
            return y

        return finish

    def _assign(
        self, layer: int, ids: torch.Tensor, pairs: torch.Tensor, excluded: set[str]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """shard -> (flat pair indices, local slots) for `pairs` of `ids`, balancing redundant copies.
        The per-expert choice works on Python ints (pairs grouped by one stable sort) and the tensors
        are cut once per shard: a decode layer is a few dozen experts, and small tensor ops cost
        microseconds each (docs/engine.md "Measured")."""
        table = self.map.copies.get(layer)
        if table is None:
            raise ShardUnavailable(f"layer {layer}: no expert shard holds this MoE layer")
        flat = ids.flatten()[pairs]
        order = torch.sort(flat, stable=True)
        experts, counts = torch.unique_consecutive(order.values, return_counts=True)
        now = time.monotonic()
        suspect = {s for s, t in self.failed_at.items() if now - t <= self.suspect_s}
        load: dict[str, int] = {}
        picked: dict[str, tuple[list[int], list[int]]] = {}  # shard -> (positions in sorted order, slots)
        start = 0
        for e, n in zip(experts.tolist(), counts.tolist(), strict=True):
            copies = table.get(e, ())
            live = [c for c in copies if c[0] not in excluded] if excluded else copies
            if not live:
                raise ShardUnavailable(f"layer {layer}: no live copy of expert {e} (failed: {sorted(excluded)})")
            if len(live) > 1:
                live = sorted([c for c in live if c[0] not in suspect] or live, key=lambda c: load.get(c[0], 0))
            m = len(live)
            for i, (shard, slot) in enumerate(live):
                size = n // m + (i < n % m)  # torch.tensor_split's sizes
                if size:
                    load[shard] = load.get(shard, 0) + size
                    where, slots = picked.setdefault(shard, ([], []))
                    where.extend(range(start, start + size))
                    slots.extend([slot] * size)
                    start += size
        dev = pairs.device
        sorted_pairs = pairs[order.indices]
        return {
            s: (sorted_pairs[torch.tensor(where, device=dev)], torch.tensor(slots, dtype=ids.dtype, device=dev))
            for s, (where, slots) in picked.items()
        }

    @staticmethod
    def _calls(x, ids, weights, assign) -> tuple[dict[str, Call], dict[str, torch.Tensor]]:
        k = ids.shape[1]
        calls, rows = {}, {}
        for shard, (pairs, slots) in assign.items():
            local = torch.full((ids.numel(),), -1, dtype=ids.dtype, device=ids.device)
            local[pairs] = slots
            tok = (pairs // k).unique()
            rows[shard] = tok
            calls[shard] = (x[tok], local.view_as(ids)[tok], weights[tok])
        return calls, rows


class InProcessTransport:
    """Shards in this process (objects with `compute(layer, x, local_ids, weights)`), called in turn."""

    def __init__(self, shards: Mapping[str, Any]):
        self.shards = dict(shards)

    def dispatch(self, layer: int, calls: Mapping[str, Call]) -> Results:
        out: Results = {}
        for shard, args in calls.items():
            try:
                out[shard] = self.shards[shard].compute(layer, *args)
            except Exception as e:  # noqa: BLE001
                out[shard] = e
        return out


class ServeTransport:
    """Calls `ExpertShard.compute` on each shard deployment through its Serve handle, concurrently."""

    def __init__(self, handles: Mapping[str, Any], timeout_s: float = 10.0):
        self.handles, self.timeout_s = dict(handles), timeout_s

    def dispatch(self, layer: int, calls: Mapping[str, Call]) -> Results:
        pending = {}
        for shard, (x, local, w) in calls.items():
            try:
                pending[shard] = self.handles[shard].compute.remote(layer, x, local, w)
            except Exception as e:  # noqa: BLE001 - a shard's failure is reported, not raised
                pending[shard] = e
        out: Results = {}
        for shard, resp in pending.items():
            if isinstance(resp, BaseException):
                out[shard] = resp
                continue
            try:
                out[shard] = resp.result(timeout_s=self.timeout_s)
            except Exception as e:  # noqa: BLE001
                out[shard] = e
        return out


class ChannelTransport:
    """Direct channels to every registered replica of every shard (one pair each: shared memory on one
    host, gloo or NCCL/HCCL between hosts), re-formed as
    replicas come and go: a background thread pairs with new ones, forgets departed ones and re-pairs
    with live ones whose channel broke, so membership changes never stall a step. A shard's call goes to one of its
    replicas in turn; if
    that channel breaks it is retried on another replica, then on `fallback` (Serve handles), and only
    then reported as the shard's error (RemoteExperts then fails over to redundant copies)."""

    def __init__(
        self,
        actor: Any,
        fallback: Transport | None = None,
        timeout_s: float = 10.0,
        refresh_s: float = 1.0,
        shards: Sequence[str] | None = None,
        device: str = "cpu",
    ):
        """`shards`: the shard names to pair with (default: every registered one); `device`: the torch
        device type this engine computes on (with each shard's, it picks the pair's link)."""
        self.actor, self.fallback, self.timeout_s, self.refresh_s = actor, fallback, timeout_s, refresh_s
        self.device = device
        self.wanted = set(shards) if shards is not None else None
        self.channels: dict[str, list[Any]] = {}  # shard -> live EngineChannels
        self.pairing: set[str] = set()  # replicas a pairing thread is working on
        self.lock = threading.Lock()
        self.turn = itertools.count()
        self.fallback_calls = 0  # shard calls that went through `fallback` (no live channel)
        self.stopped = threading.Event()
        threading.Thread(target=self._refresh_loop, name="v4d-channels", daemon=True).start()

    def ready(self, shards: Sequence[str], timeout_s: float = 60.0) -> bool:
        """Wait until every shard in `shards` has at least one channel."""
        deadline = time.monotonic() + timeout_s
        while not all(self._live(s) for s in shards):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def dispatch(self, layer: int, calls: Mapping[str, Call]) -> Results:
        return self.start(layer, calls)()

    def start(self, layer: int, calls: Mapping[str, Call]) -> Callable[[], Results]:
        """Send every shard's call now; the returned function collects the answers (retrying a broken
        channel on another replica, then the fallback)."""
        tag = current_tag()
        started, rest = {}, {}
        for shard, args in calls.items():
            got = self._start(shard, tag, layer, args, exclude=None)
            if got is None:
                rest[shard] = args
            else:
                started[shard] = got
        return lambda: self._finish(tag, layer, calls, started, rest)

    def _finish(
        self, tag: int, layer: int, calls: Mapping[str, Call], started: dict[str, Any], rest: dict[str, Call]
    ) -> Results:
        out: Results = {}
        for shard, (ch, pending) in started.items():
            try:
                out[shard] = ch.receive(tag, pending)
            except Exception as e:  # noqa: BLE001 - try another replica of the shard, then the fallback
                log.warning("channel to %s broke on layer %d: %r", ch.replica, layer, e)
                again = self._start(shard, tag, layer, calls[shard], exclude=ch)
                if again is None:
                    rest[shard] = calls[shard]
                else:
                    try:
                        out[shard] = again[0].receive(tag, again[1])
                    except Exception:  # noqa: BLE001
                        rest[shard] = calls[shard]
        if rest:
            if self.fallback is None:
                out.update({s: ConnectionError(f"shard {s}: no live channel") for s in rest})
            else:
                self.fallback_calls += len(rest)
                out.update(self.fallback.dispatch(layer, rest))
        return out

    def stats(self) -> dict[str, Any]:
        """Live channels per shard, the link their devices call for and the backend they run, and calls
        that fell back to Serve (engine stats, tests)."""
        with self.lock:
            live = {s: sum(not c.dead for c in cs) for s, cs in self.channels.items()}
            links = {s: sorted({c.link for c in cs if not c.dead}) for s, cs in self.channels.items()}
            backends = {s: sorted({c.backend for c in cs if not c.dead}) for s, cs in self.channels.items()}
        return {
            "expert_channels": live,
            "expert_channel_links": links,
            "expert_channel_backends": backends,
            "expert_fallback_calls": self.fallback_calls,
        }

    def close(self) -> None:
        self.stopped.set()
        with self.lock:
            chans = [c for cs in self.channels.values() for c in cs]
            self.channels = {}
        for ch in chans:
            ch.close()

    def _live(self, shard: str) -> list[Any]:
        with self.lock:
            return [c for c in self.channels.get(shard, ()) if not c.dead]

    def _start(self, shard: str, tag: int, layer: int, args: Call, exclude: Any) -> tuple[Any, Any] | None:
        live = [c for c in self._live(shard) if c is not exclude]
        n = next(self.turn)
        for i in range(len(live)):
            ch = live[(n + i) % len(live)]
            try:
                return ch, ch.send(tag, layer, *args)
            except Exception as e:  # noqa: BLE001
                log.warning("channel to %s broke on send: %r", ch.replica, e)
        return None

    def _refresh_loop(self) -> None:
        import ray

        while not self.stopped.is_set():
            try:
                members = ray.get(self.actor.shards.remote(), timeout=self.timeout_s)
            except Exception as e:  # noqa: BLE001 - keep the channels we have; try again
                log.warning("rendezvous unreachable: %r", e)
                members = None
            if members is not None:
                self._update({r: s for r, s in members.items() if self.wanted is None or s in self.wanted})
            self.stopped.wait(self.refresh_s)

    def _update(self, members: Mapping[str, str]) -> None:
        """Forget departed replicas and broken channels; pair with every member that has neither a
        live channel nor a pairing under way (new replicas, and live ones whose channel broke)."""
        with self.lock:
            gone = [c for cs in self.channels.values() for c in cs if c.dead or c.replica not in members]
            for shard, chans in self.channels.items():
                self.channels[shard] = [c for c in chans if c not in gone]
            paired = {c.replica for cs in self.channels.values() for c in cs} | self.pairing
            new = {r: s for r, s in members.items() if r not in paired}
            self.pairing |= set(new)
        for ch in gone:
            ch.close()  # a departed replica's live pair: let its shard threads end
        for replica, shard in new.items():
            threading.Thread(target=self._pair, args=(shard, replica), daemon=True).start()

    def _pair(self, shard: str, replica: str) -> None:
        try:
            ch = connect(self.actor, shard, replica, self.timeout_s, self.device)
        except Exception as e:  # noqa: BLE001 - a replica that left or died before pairing
            log.warning("pairing with %s failed: %r", replica, e)
            ch = None
        with self.lock:
            self.pairing.discard(replica)
            if ch is not None:
                self.channels.setdefault(shard, []).append(ch)
