"""Scheduler + KV manager as pure Python: batching, chunked prefill, preemption, admission, prefix sharing."""

import pytest

from v4d.serving.engine.kv_manager import KVManager
from v4d.serving.engine.scheduler import Scheduler
from v4d.serving.engine.sequence import SamplingParams, Sequence, Status
from v4d.serving.errors import ContextTooLong, Overloaded

P = 8  # page tokens (small so tests cross pages quickly)


def make(num_pages=16, num_slots=4, max_num_seqs=4, max_batch_tokens=32, max_queue=8, snapshots=0, copies=None):
    kv = KVManager(
        num_pages,
        num_slots,
        page_tokens=P,
        page_bytes=100,
        slot_bytes=10,
        num_snapshots=snapshots,
        copy_slot=(lambda s, d: copies.append((s, d))) if copies is not None else None,
    )
    return Scheduler(kv, max_num_seqs, max_batch_tokens, max_queue, max_context_tokens=10_000)


def seq(n_prompt, max_tokens=4, rid=None, base=0):
    return Sequence(
        rid or f"r{n_prompt}-{base}", [base + i for i in range(n_prompt)], SamplingParams(max_tokens=max_tokens)
    )


def step(s: Scheduler, token=5):
    batch = s.schedule()
    for q in s.advance(batch):
        q.output.append(token)
        if len(q.output) >= q.params.max_tokens:
            s.finish(q, "length")
    return batch


def run(s, limit=200):
    for _ in range(limit):
        if not (s.running or s.waiting):
            return
        step(s)
    raise AssertionError("did not drain")


def test_chunked_prefill_and_decode_first_batching():
    s = make(max_batch_tokens=10)
    a, b = seq(20, rid="a"), seq(3, rid="b")
    s.add(a)
    s.add(b)
    assert [(q.request_id, n) for q, n in step(s)] == [("a", 10)]  # budget spent on a's first chunk
    assert [(q.request_id, n) for q, n in step(s)] == [("a", 10)]  # a's prefill ends, a samples
    assert a.output == [5] and a.num_remaining == 1
    # decode first (a: 1 token), then b's whole prompt fits in the rest of the budget
    assert [(q.request_id, n) for q, n in step(s)] == [("a", 1), ("b", 3)]
    assert [(q.request_id, n) for q, n in step(s)] == [("a", 1), ("b", 1)]
    run(s)
    assert a.status is b.status is Status.FINISHED and len(a.output) == len(b.output) == 4
    assert s.kv.num_used_pages == 0 and s.kv.num_used_slots == 0 and s.kv.utilization == 0


def test_max_num_seqs_limits_running():
    s = make(max_num_seqs=2)
    seqs = [seq(4, rid=f"q{i}") for i in range(3)]
    for q in seqs:
        s.add(q)
    step(s)
    assert [q.request_id for q in s.running] == ["q0", "q1"] and list(s.waiting) == [seqs[2]]


def test_exact_byte_accounting():
    s = make()
    a = seq(9)  # 9 tokens -> 2 pages of 8
    s.add(a)
    step(s)
    kv = s.kv
    assert kv.num_used_pages == 2 and kv.num_used_slots == 1
    assert kv.used_bytes == 2 * 100 + 1 * 10
    assert kv.capacity_bytes == 16 * 100 + 4 * 10
    assert kv.utilization == pytest.approx(210 / 1640)


def test_preemption_by_recompute_under_pressure():
    # 4 pages of 8 tokens: two sequences of 8-token prompts hold one page each, then grow.
    s = make(num_pages=4, max_batch_tokens=64)
    a, b = seq(8, max_tokens=12, rid="a"), seq(8, max_tokens=12, rid="b", base=100)
    s.add(a)
    s.add(b)
    run(s)
    assert s.num_preemptions >= 1
    assert a.status is b.status is Status.FINISHED
    assert len(a.output) == len(b.output) == 12
    assert s.kv.num_used_pages == 0 and s.kv.num_free_pages == 4


def test_preempted_sequence_is_requeued_first_and_recomputes_everything():
    s = make(num_pages=3, max_batch_tokens=64)
    a, b = seq(8, max_tokens=14, rid="a"), seq(8, max_tokens=14, rid="b", base=100)
    s.add(a)
    s.add(b)
    while not s.num_preemptions:
        step(s)
    assert s.waiting[0] is b and b.num_computed == 0 and b.pages == [] and b.slot == -1
    assert b.output  # its generated tokens are kept and will be recomputed with the prompt
    step(s)
    assert a.status is Status.RUNNING


def test_admission_waits_for_pages_never_overcommits():
    s = make(num_pages=4)
    a, b = seq(24, rid="a"), seq(16, rid="b")  # 3 + 2 pages > 4
    s.add(a)
    s.add(b)
    step(s)
    assert s.running == [a] and list(s.waiting) == [b]
    assert s.kv.num_used_pages == 3
    run(s)
    assert b.status is Status.FINISHED


def test_overloaded_when_waiting_queue_full():
    s = make(max_queue=2)
    s.add(seq(4, rid="x"))
    s.add(seq(4, rid="y"))
    with pytest.raises(Overloaded) as e:
        s.add(seq(4, rid="z"))
    assert e.value.retry_after_s == s.retry_after_s == 1.0  # nothing finished yet: the configured floor


def test_retry_after_is_the_measured_drain_interval_not_the_idle_time_before():
    now = [0.0]
    s = make(max_num_seqs=1, max_queue=3)
    s.clock = lambda: now[0]
    first = seq(4, rid="early", max_tokens=1)
    s.add(first)
    step(s)  # admitted (left the queue) at t=0, then finished
    now[0] = 1000.0  # a long idle stretch: it says nothing about the drain rate of the next burst
    for i in range(3):
        s.add(seq(4, rid=f"b{i}", max_tokens=1))
    step(s)  # b0 admitted at t=1000 (the queue moved just now)
    assert s.retry_after() == 1.0  # the floor: the queue moved this instant, no interval measured yet
    for t in (1002.0, 1004.0):  # one admission every 2 s: b1, b2 follow as each one finishes
        now[0] = t
        step(s)
    for i in range(3):
        s.add(seq(4, rid=f"w{i}", max_tokens=1))
    with pytest.raises(Overloaded) as e:
        s.add(seq(4, rid="refused"))
    assert e.value.retry_after_s == pytest.approx(2.0)  # a place frees every 2 s (t=0 is outside the window)
    now[0] = 1009.0  # the queue has not moved for 5 s: that is the better estimate now
    assert s.retry_after() == pytest.approx(5.0)
    now[0] = 5000.0  # stalled for an hour: capped, never unbounded
    assert s.retry_after() == 60.0


def test_context_too_long_when_it_can_never_fit():
    s = make(num_pages=4)  # 32 tokens in all
    with pytest.raises(ContextTooLong) as e:
        s.add(seq(30, max_tokens=8))
    assert (e.value.limit, e.value.got) == (32, 38)
    s.add(seq(24, max_tokens=8))  # exactly fits


def test_prefix_sharing_reuses_pages_and_snapshot():
    copies = []
    s = make(num_pages=16, snapshots=2, copies=copies, max_batch_tokens=64)
    a = seq(20, max_tokens=2, rid="a")
    s.add(a)
    assert [n for _, n in step(s)] == [16]  # chunk stops at the boundary (last full page inside the prompt)
    assert copies == [(a.slot, 4)]  # state snapshot at token 16 into snapshot slot 4
    a_pages = list(a.pages[:2])
    # b shares a's first two pages while a still runs
    b = seq(19, max_tokens=2, rid="b")
    s.add(b)
    batch = step(s)
    assert b.num_cached == 16 and b.pages[:2] == a_pages
    assert (b, 3) in batch  # only the 3 tokens past the boundary are computed
    assert copies[-1] == (4, b.slot)
    assert s.kv.ref[a_pages[0]] == 2
    run(s)
    # cached pages outlive the sequences and count as free; a third prompt still hits them
    assert s.kv.num_used_pages == 0 and s.kv.num_free_pages == 16
    c = seq(17, max_tokens=2, rid="c")
    s.add(c)
    step(s)
    assert c.num_cached == 16 and c.pages[:2] == a_pages
    assert s.kv.prefix_hits == 32


def test_prefix_cache_pages_are_evicted_when_memory_is_needed():
    copies = []
    s = make(num_pages=4, snapshots=1, copies=copies, max_batch_tokens=64)
    a = seq(17, max_tokens=1, rid="a")
    s.add(a)
    run(s)
    assert len(s.kv.entries) == 1 and s.kv.num_free_pages == 4
    b = seq(30, max_tokens=2, rid="b", base=500)  # needs all 4 pages: evicts a's cached prefix
    s.add(b)
    run(s)
    assert b.status is Status.FINISHED
    assert list(s.kv.entries) == [s.kv._key(b.prompt, 24)]  # a's entry evicted; b's took the snapshot slot
