"""Same-host expert pairs through shared memory (docs/engine.md "Transport").

Where an engine replica and a shard replica share a host (one kernel, IPC and mount namespace: the
processes of `v4d serve`, tests, replicas in one container), a call needs no socket: the engine writes
it into a shared-memory region and wakes the shard through a FIFO, the shard writes the reply after
the request and wakes the engine through a second FIFO. One wake-up per direction; gloo over
loopback TCP hands every message through its own I/O threads (about 0.3 ms a round trip on an idle
2-core VM, milliseconds under load, against about 10 us here).

Per tag (micro-batch): a control block (int64: layer, tokens, k, d, the data region's generation, the
two ends' pids) and a data region (float32: the request [tokens x (x | local ids | weights)], then
the reply [tokens x d]). A call too large for the region gets a new one, announced by its
generation. The names live in /dev/shm only until the shard has opened them (the engine then unlinks
them), so a crash leaves nothing behind. Each end waits in slices and checks the other's pid, so a
dead peer is noticed in SLICE_S, not at the timeout; a shard whose compute fails says so at once.
"""

from __future__ import annotations

import mmap
import os
import select
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

SHM_DIR = Path("/dev/shm")
SHM_PAIRS_ENV = "V4D_SHM_PAIRS"  # "0": same-host pairs run gloo like any other
LAYER, TOKENS, K, D, GEN, SHARD_PID, ENGINE_PID = range(7)
CONTROL = 8  # int64 slots
CLOSE, FAILED = -1, -2  # layer values: the engine closes the tag; the shard's compute raised
MIN_FLOATS = 1 << 16  # the first data region (256 KiB: a decode call's request and reply)
SLICE_S = 0.1


def shm_pairs() -> bool:
    return os.environ.get(SHM_PAIRS_ENV, "1") != "0" and SHM_DIR.is_dir()


def host_identity() -> str:
    """Equal for processes that can open each other's /dev/shm files: one kernel boot, IPC and mount
    namespace ("" where unknown: never equal to anything)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return ":".join((boot, os.readlink("/proc/self/ns/ipc"), os.readlink("/proc/self/ns/mnt")))
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _map(name: str, dtype: torch.dtype, numel: int = 0) -> torch.Tensor:
    """A /dev/shm file as a tensor: created with `numel` elements, or opened whole (numel 0). The
    mapping lives as long as the tensor and its views."""
    path, item = SHM_DIR / name, torch.empty(0, dtype=dtype).element_size()
    fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if numel else 0), 0o600)
    try:
        if numel:
            os.ftruncate(fd, numel * item)
        size = os.fstat(fd).st_size
        return torch.frombuffer(mmap.mmap(fd, size), dtype=dtype)
    finally:
        os.close(fd)


def _fifo(name: str, create: bool) -> int:
    path = SHM_DIR / name
    if create:
        os.mkfifo(path, 0o600)
    return os.open(path, os.O_RDWR)  # read-write: never blocks on open, never sees EOF


def _wait(fd: int, peer: Callable[[], int], deadline: float, what: str) -> None:
    """Take one wake-up byte from `fd`; raise if the peer's process is gone or at the deadline."""
    while not select.select([fd], [], [], SLICE_S)[0]:
        pid = peer()
        if pid and not _alive(pid):
            raise ConnectionError(f"{what}: peer process {pid} is gone")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: no answer in time")
    os.read(fd, 1)


class _Names:
    def __init__(self, base: str, tag: int):
        self.prefix = f"{base}-{tag}"
        self.control, self.request, self.reply = f"{self.prefix}-c", f"{self.prefix}-q", f"{self.prefix}-r"

    def data(self, gen: int) -> str:
        return f"{self.prefix}-d{gen}"


# -- the engine end -----------------------------------------------------------------------------
class _EngineTag:
    def __init__(self, base: str, tag: int):
        self.names = _Names(base, tag)
        # numpy: a scalar read or write of the control block costs ~0.1 us, a tensor's 1-2 us (several per call)
        self.control = _map(self.names.control, torch.int64, CONTROL).numpy()
        self.control[ENGINE_PID] = os.getpid()
        self.data = _map(self.names.data(0), torch.float32, MIN_FLOATS)
        self.request, self.reply = _fifo(self.names.request, True), _fifo(self.names.reply, True)
        self.lock = threading.Lock()
        self.unlink_after_reply: str | None = None

    def grow(self, floats: int) -> None:
        gen = int(self.control[GEN]) + 1
        self.data = _map(self.names.data(gen), torch.float32, max(floats, 2 * self.data.numel()))
        self.control[GEN] = gen
        self.unlink_after_reply = self.names.data(gen)  # the shard opens it on this call

    def unlink(self, gen_only: bool = False) -> None:
        names = [] if gen_only else [self.names.control, self.names.data(0), self.names.request, self.names.reply]
        if self.unlink_after_reply:
            names.append(self.unlink_after_reply)
            self.unlink_after_reply = None
        for n in names:
            (SHM_DIR / n).unlink(missing_ok=True)

    def close(self) -> None:
        os.close(self.request)
        os.close(self.reply)


class ShmEngineChannel:
    """The engine's end of a same-host pair; the interface of channels.EngineChannel."""

    backend = "shm"

    def __init__(self, base: str, shard: str, replica: str, timeout_s: float, link: str = "gloo", tags: int = 2):
        self.shard, self.replica, self.link, self.timeout_s = shard, replica, link, timeout_s
        self.device = torch.device("cpu")
        self.dead = False
        self.tags: list[_EngineTag] = []
        try:
            self.tags = [_EngineTag(base, t) for t in range(tags)]
        except BaseException:
            self._forget()
            raise

    def joined(self, timeout_s: float) -> None:
        """Wait until the shard has opened every tag (its pid in each control block), then unlink the
        names: from here on only the two processes hold them."""
        deadline = time.monotonic() + timeout_s
        try:
            while not all(int(t.control[SHARD_PID]) for t in self.tags):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"shard replica {self.replica} did not join in {timeout_s} s")
                time.sleep(0.001)
        finally:
            for t in self.tags:
                t.unlink()

    def send(self, tag: int, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> Any:
        """Start a call; returns what `receive` needs. Holds the tag's lock until `receive`."""
        t = self.tags[tag]
        t.lock.acquire()
        try:
            n, d = x.shape
            k = ids.shape[1]
            if n * (2 * d + 2 * k) > t.data.numel():
                t.grow(n * (2 * d + 2 * k))
            body = t.data[: n * (d + 2 * k)].view(n, d + 2 * k)
            body[:, :d], body[:, d : d + k], body[:, d + k :] = x, ids, w
            t.control[: D + 1] = (layer, n, k, d)
            os.write(t.request, b"\0")
            return n, d, k
        except BaseException:
            self.dead = True
            t.lock.release()
            raise

    def receive(self, tag: int, pending: Any) -> torch.Tensor:
        n, d, k = pending
        t = self.tags[tag]
        try:
            _wait(t.reply, lambda: int(t.control[SHARD_PID]), time.monotonic() + self.timeout_s, self.replica)
            if int(t.control[LAYER]) == FAILED:
                raise RuntimeError(f"shard replica {self.replica} failed on this call (its log says why)")
            start = n * (d + 2 * k)
            return t.data[start : start + n * d].view(n, d).clone()
        except BaseException:
            self.dead = True  # a broken pair is never reused: the engine re-pairs from the rendezvous
            raise
        finally:
            t.unlink(gen_only=True)
            t.lock.release()

    def close(self) -> None:
        """End the pair: the shard's tag loops are told to stop (after a failure too: they would
        otherwise wait as long as this process lives), then this end lets go."""
        self.dead = True
        for t in self.tags:
            with t.lock:
                t.control[LAYER] = CLOSE
                os.write(t.request, b"\0")
        self._forget()

    def _forget(self) -> None:
        for t in self.tags:
            t.unlink()
            t.close()
        self.tags = []


# -- the shard end ------------------------------------------------------------------------------
class ShardTag:
    """The shard's end of one tag: opened at construction, which the engine sees (the shard's pid in
    the control block) and then unlinks the names."""

    def __init__(self, base: str, tag: int):
        self.names = _Names(base, tag)
        self.control = _map(self.names.control, torch.int64).numpy()  # see _EngineTag
        self.data = _map(self.names.data(0), torch.float32)
        self.request, self.reply = _fifo(self.names.request, False), _fifo(self.names.reply, False)
        self.control[SHARD_PID] = os.getpid()

    def serve(
        self, compute: Callable[..., torch.Tensor], stopped: threading.Event, on_error: Callable[[BaseException], None]
    ) -> None:
        """Answer calls until the engine closes the tag or its process is gone."""
        gen = 0
        try:
            while not stopped.is_set():
                _wait(self.request, lambda: int(self.control[ENGINE_PID]), float("inf"), "engine")
                layer, n, k, d, g = self.control[: GEN + 1].tolist()
                if layer == CLOSE:
                    return
                if g != gen:
                    self.data, gen = _map(self.names.data(g), torch.float32), g
                rows = self.data[: n * (d + 2 * k)].view(n, d + 2 * k)
                try:
                    y = compute(layer, rows[:, :d], rows[:, d : d + k].long(), rows[:, d + k :])
                    self.data[n * (d + 2 * k) : n * (2 * d + 2 * k)].view(n, d).copy_(y)
                except Exception:
                    self.control[LAYER] = FAILED  # the engine retries elsewhere at once
                    os.write(self.reply, b"\0")
                    raise
                os.write(self.reply, b"\0")
        except Exception as e:  # noqa: BLE001 - a failed call or a gone engine: this tag's loop ends
            if not stopped.is_set():
                on_error(e)
        finally:
            os.close(self.request)
            os.close(self.reply)
