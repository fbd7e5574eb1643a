"""The engine loop over the real model: greedy equals the model's own greedy, alone or batched,
through chunked prefill, prefix sharing and preemption; sampling, stops, aborts and errors."""

import asyncio

import pytest
import torch

from v4d.serving.config import TINY_FAST
from v4d.serving.engine.engine import Engine, EngineLimits
from v4d.serving.engine.sequence import SEED_MAX, SEED_MIN
from v4d.serving.errors import BadRequest, ContextTooLong, Overloaded, ShardUnavailable
from v4d.serving.model.model import Transformer, init_weights
from v4d.serving.sizing import page_bytes, slot_bytes

from .reference import greedy

CFG = TINY_FAST
PB, SB = page_bytes(CFG, "fp32"), slot_bytes(CFG, "fp32")


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)  # tiny matrices: threads only add contention on a shared 2-core box
    return init_weights(Transformer(CFG), seed=0).eval()


def engine(model, pages=8, seqs=4, snaps=1, batch_tokens=64, queue=8, context=4096):
    budget = (seqs + snaps) * SB + pages * PB
    return Engine(
        model, EngineLimits(budget, seqs, batch_tokens, queue, context, prefix_snapshots=snaps, kv_format="fp32")
    )


async def collect(eng, prompt, n, **kw):
    tokens, items = [], []
    async for item in eng.generate({"prompt_token_ids": prompt, "max_tokens": n, "ignore_eos": True, **kw}):
        tokens += item["token_ids"]
        items.append(item)
    return tokens, items


def prompt(n, start=3):
    return [(start + 7 * i) % CFG.vocab_size for i in range(n)]


def test_greedy_equals_model_single_and_batched(model):
    prompts = [prompt(24), prompt(9, 100), prompt(40, 200)]
    want = [greedy(model, p, 4) for p in prompts]
    eng = engine(model, batch_tokens=16)  # 16-token budget: prompts are prefilled in chunks

    async def run():
        alone, items = await collect(eng, prompts[0], 4)
        together = await asyncio.gather(*(collect(eng, p, 4) for p in prompts))
        return alone, items, together

    alone, items, together = asyncio.run(run())
    assert alone == want[0]
    assert [t for t, _ in together] == want
    assert items[-1] == {
        "token_ids": [want[0][-1]],
        "finish_reason": "length",
        "num_prompt_tokens": 24,
        "num_output_tokens": 4,
    }
    s = eng.stats()
    assert s["num_steps"] < 2 * (3 + 2 + 3 + 4)  # concurrent requests shared steps
    assert s["num_running"] == s["num_waiting"] == s["num_pages_in_use"] == s["num_state_slots_in_use"] == 0


def test_shared_prefix_skips_recompute_and_gives_the_same_tokens(model):
    base = prompt(140)
    a, b = base + [5, 6], base + [9]
    eng = engine(model, pages=8)

    async def run():
        first = await collect(eng, a, 3)
        return first, await collect(eng, b, 3)

    _, (tb, _) = asyncio.run(run())
    assert eng.stats()["prefix_cache_hits"] == 128  # b reused a's first page and state snapshot
    assert tb == greedy(model, b, 3)


def test_preemption_under_kv_pressure_keeps_outputs_exact(model):
    # Two pages in all: each prompt takes one; when the long one grows past 128 tokens it needs a
    # third, so the newest (the short one) is preempted, then recomputed once pages free up.
    prompts = [prompt(124), prompt(6, 50)]
    eng = engine(model, pages=2, batch_tokens=256)

    async def run():
        return await asyncio.gather(*(collect(eng, p, 8) for p in prompts))

    out = asyncio.run(run())
    assert eng.stats()["num_preemptions"] >= 1
    assert [t for t, _ in out] == [greedy(model, p, 8) for p in prompts]


def test_seeded_sampling_is_reproducible(model):
    eng = engine(model)
    p = prompt(12)

    async def run():
        kw = {"temperature": 1.0, "top_p": 0.9}
        return [(await collect(eng, p, 6, seed=s, **kw))[0] for s in (1, 1, 2)]

    x, y, z = asyncio.run(run())
    assert x == y and x != z


def test_stop_token_and_abort(model):
    p = prompt(10)
    ref = greedy(model, p, 3)
    eng = engine(model)

    async def run():
        stopped = await collect(eng, p, 10, stop_token_ids=[ref[2]])
        gen = eng.generate({"request_id": "r1", "prompt_token_ids": p, "max_tokens": 50, "ignore_eos": True})
        first = await gen.__anext__()
        assert eng.abort("r1")
        rest = [item async for item in gen]
        return stopped, first, rest

    (tokens, items), first, rest = asyncio.run(run())
    assert tokens == ref[:2] and items[-1]["finish_reason"] == "stop" and items[-1]["num_output_tokens"] == 3
    assert first["token_ids"] == ref[:1] and rest[-1]["finish_reason"] == "abort"
    assert eng.stats()["num_pages_in_use"] == 0 and not eng.seqs


def test_a_lagging_caller_gets_the_ready_tokens_in_one_item(model):
    p = prompt(10)
    want = greedy(model, p, 6)
    eng = engine(model)

    async def run():
        gen = eng.generate({"request_id": "slow", "prompt_token_ids": p, "max_tokens": 6, "ignore_eos": True})
        first = await gen.__anext__()
        while "slow" in eng.seqs:  # the caller takes nothing while the request runs to its end
            await asyncio.sleep(0.01)
        return first, [item async for item in gen]

    first, rest = asyncio.run(run())
    assert first["token_ids"] == want[:1]
    assert rest == [{"token_ids": want[1:], "finish_reason": "length", "num_prompt_tokens": 10, "num_output_tokens": 6}]


def test_errors(model):
    eng = engine(model, pages=2, queue=1)

    async def run():
        with pytest.raises(ContextTooLong) as e:
            await collect(eng, prompt(200), 100)
        assert (e.value.limit, e.value.got) == (256, 300)
        with pytest.raises(BadRequest, match="max_tokens"):
            await collect(eng, prompt(5), 0)
        with pytest.raises(BadRequest, match="prompt_token_ids"):
            await collect(eng, [CFG.vocab_size], 1)
        # the queue holds one waiting request: the third concurrent one is refused
        gens = [eng.generate({"prompt_token_ids": prompt(5), "max_tokens": 2}) for _ in range(3)]
        results = await asyncio.gather(*(g.__anext__() for g in gens), return_exceptions=True)
        assert any(isinstance(r, Overloaded) and r.retry_after_s > 0 for r in results)
        for g in gens:
            await g.aclose()

    asyncio.run(run())


def test_seed_range_is_what_a_torch_generator_takes():
    gen = torch.Generator()
    for ok in (SEED_MIN, SEED_MAX):
        gen.manual_seed(ok)
    for bad in (SEED_MIN - 1, SEED_MAX + 1):
        with pytest.raises((ValueError, RuntimeError)):
            gen.manual_seed(bad)


def test_invalid_requests_never_stay_queued(model, monkeypatch):
    """A flood of requests that fail validation or seeding leaves nothing queued; the engine keeps serving."""
    eng = engine(model, queue=4)
    p = prompt(6)

    async def run():
        for i in range(40):  # 10x the queue: each would jam a slot if it stayed queued
            seed = (SEED_MAX + 1, SEED_MIN - 1, 1 << 200, -(1 << 64))[i % 4]
            with pytest.raises(BadRequest, match="seed"):
                await collect(eng, p, 2, seed=seed, temperature=1.0)
        assert eng.stats()["num_waiting"] == 0 and not eng.seqs and not eng.generators
        with monkeypatch.context() as m:  # seeding itself failing: refused before admission
            m.setattr(torch, "Generator", lambda: type("Failing", (), {"manual_seed": lambda self, s: 1 / 0})())
            for _ in range(8):
                with pytest.raises(ZeroDivisionError):
                    await collect(eng, p, 2, seed=1, temperature=1.0)
        assert eng.stats()["num_waiting"] == 0 and not eng.seqs and not eng.queues
        ok = await asyncio.gather(*(collect(eng, p, 3, seed=s, temperature=1.0) for s in (SEED_MIN, SEED_MAX, 7)))
        return ok

    ok = asyncio.run(run())
    assert all(len(tokens) == 3 and items[-1]["finish_reason"] == "length" for tokens, items in ok)
    assert eng.stats()["num_waiting"] == eng.stats()["num_running"] == 0


class FlakyExperts:
    """The model's own experts behind a fault injector: the first `failures` calls raise."""

    def __init__(self, inner, failures):
        self.inner, self.failures, self.calls = inner, failures, 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls <= self.failures:
            raise ShardUnavailable("layer 0: no live copy of expert 3 (injected)")
        return self.inner(*args)


def test_unreachable_experts_are_retried_then_fail_cleanly(model):
    p = prompt(20)
    want = greedy(model, p, 4)
    local = model.experts
    try:
        model.experts = FlakyExperts(local, failures=2)
        eng = engine(model)
        eng.retry_backoff_s = 0.01
        tokens, _ = asyncio.run(collect(eng, p, 4))
        assert tokens == want  # the failed steps were recomputed, output unchanged
        model.experts = FlakyExperts(local, failures=10**9)
        with pytest.raises(ShardUnavailable):
            asyncio.run(collect(eng, p, 4))
        assert eng.stats()["num_pages_in_use"] == 0 and not eng.seqs
    finally:
        model.experts = local


def test_kv_format_is_checked_and_sizes_the_cache(model):
    with pytest.raises(ValueError, match=r"engine.kv_format: expected deployed, bf16 or fp32, got 'fp8'"):
        Engine(model, EngineLimits(10 * SB, 2, 16, 4, 512, kv_format="fp8"))
    eng = Engine(
        model,
        EngineLimits(
            3 * slot_bytes(CFG, "deployed") + 5 * page_bytes(CFG, "deployed"), 2, 16, 4, 512, prefix_snapshots=1
        ),
    )
    assert eng.kv.fmt == "deployed" and eng.kv.num_pages == 5
    assert eng.kv.page_nbytes == page_bytes(CFG, "deployed") and eng.stats()["capacity_tokens"] == 5 * 128
