"""Continuous batching: decode first, then chunked prefill, under max_num_seqs / max_batch_tokens.

Every step each running sequence that is decoding gets one token; the remaining token budget goes to
prefill chunks of running sequences, then to admitting waiting ones (FIFO). A sequence is admitted
only when a state slot and pages for all its tokens fit; a decode that needs a new page it cannot
get preempts the newest running sequence (its pages are freed and it is requeued at the front to
be recomputed). Requests that could never fit are refused up front (ContextTooLong), and a full
waiting queue refuses new ones (Overloaded), so memory is never over-committed.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from v4d.serving.engine.kv_manager import KVManager
from v4d.serving.engine.sequence import Sequence, Status
from v4d.serving.errors import ContextTooLong, Overloaded

MAX_RETRY_AFTER_S = 60.0
DRAIN_WINDOW = 32  # recent departures from the waiting queue the Retry-After estimate uses


class Scheduler:
    def __init__(
        self,
        kv: KVManager,
        max_num_seqs: int,
        max_batch_tokens: int,
        max_queue: int,
        max_context_tokens: int,
        retry_after_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.kv = kv
        self.max_num_seqs, self.max_batch_tokens, self.max_queue = max_num_seqs, max_batch_tokens, max_queue
        self.max_context_tokens = min(max_context_tokens, kv.capacity_tokens)
        self.retry_after_s, self.clock = retry_after_s, clock
        self._drained: deque[float] = deque(maxlen=DRAIN_WINDOW)  # when requests left the waiting queue
        self._moved_at = 0.0  # the queue's last departure, or when it last filled from empty
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        if seq.max_total_tokens > self.max_context_tokens:
            raise ContextTooLong(self.max_context_tokens, seq.max_total_tokens)
        if len(self.waiting) >= self.max_queue:
            raise Overloaded(self.retry_after())
        self._enqueue(seq)

    def retry_after(self) -> float:
        """Seconds until a refused client finds a place in the queue: the measured interval between
        departures from it (admitted or aborted requests), over the recent ones only, so idle time
        before a burst does not count. While the queue has not moved for longer than that interval,
        the time since it last moved is the better estimate. Clamped to [retry_after_s, 60]."""
        now = self.clock()
        recent = [t for t in self._drained if now - t <= MAX_RETRY_AFTER_S]
        interval = (recent[-1] - recent[0]) / (len(recent) - 1) if len(recent) >= 2 else 0.0
        stalled = now - self._moved_at if self.waiting else 0.0
        return min(MAX_RETRY_AFTER_S, max(self.retry_after_s, interval, stalled))

    def _enqueue(self, seq: Sequence, first: bool = False) -> None:
        if not self.waiting:
            self._moved_at = self.clock()
        if first:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def _drain(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        self._moved_at = self.clock()
        self._drained.append(self._moved_at)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The next batch: (sequence, number of its uncomputed tokens to run now)."""
        batch: list[tuple[Sequence, int]] = []
        budget = self.max_batch_tokens
        for seq in list(self.running):  # decodes, oldest first
            if seq.status is not Status.RUNNING or seq.num_remaining != 1 or budget == 0:
                continue
            while not self.kv.grow(seq, seq.num_tokens):
                self.preempt(self.running[-1])
                if seq.status is not Status.RUNNING:
                    break
            else:
                batch.append((seq, 1))
                budget -= 1
        for seq in self.running:  # unfinished prefills
            if budget and seq.num_remaining > 1:
                n = self._chunk(seq, budget)
                batch.append((seq, n))
                budget -= n
        while budget and self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.kv.admit(seq):
                break
            self._drain(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = self._chunk(seq, budget)
            batch.append((seq, n))
            budget -= n
        return batch

    def advance(self, batch: list[tuple[Sequence, int]]) -> list[Sequence]:
        """After the forward: mark the chunks computed; returns the sequences whose logits are due a sample."""
        due = []
        for seq, n in batch:
            seq.num_computed += n
            self.kv.maybe_snapshot(seq)
            if seq.num_remaining == 0:
                due.append(seq)
        return due

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Prefill chunk size; it stops at the prefix-snapshot boundary so the state there can be cached."""
        n = min(seq.num_remaining, budget)
        b = self.kv.snapshot_boundary(seq)
        if seq.num_computed < b:
            n = min(n, b - seq.num_computed)
        return n

    def preempt(self, seq: Sequence) -> None:
        """Free `seq`'s cache and requeue it first; it will recompute prompt + output so far."""
        self.running.remove(seq)
        self.kv.free(seq)
        seq.status, seq.num_computed, seq.num_cached = Status.WAITING, 0, 0
        self._enqueue(seq, first=True)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.kv.free(seq)
        elif seq.status is Status.WAITING:
            self._drain(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason
