"""The engine loop over the real model: greedy equals the model's own greedy, alone or batched,
through chunked prefill, prefix sharing and preemption; sampling, stops, aborts and errors."""

import asyncio

import pytest
import torch

from v4d.serving.config import TINY_FAST
from v4d.serving.engine.engine import Engine, EngineLimits
from v4d.serving.errors import BadRequest, ContextTooLong, Overloaded
from v4d.serving.model.cache import page_bytes, slot_bytes
from v4d.serving.model.model import Transformer, init_weights

CFG = TINY_FAST
PB, SB = page_bytes(CFG, "fp32"), slot_bytes(CFG, "fp32")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return init_weights(Transformer(CFG), seed=0).eval()


def engine(model, pages=8, seqs=4, snaps=1, batch_tokens=64, queue=8, context=4096):
    budget = (seqs + snaps) * SB + pages * PB
    return Engine(model, EngineLimits(budget, seqs, batch_tokens, queue, context, prefix_snapshots=snaps))


def greedy(model, prompt, n):
    """The in-process model's greedy continuation: one prefill, then one token at a time."""
    kv, seq = model.scratch_cache(len(prompt) + n)
    logits = model.forward([(prompt, seq)], kv)[0]
    out = []
    for i in range(n):
        out.append(int(logits.argmax()))
        if i + 1 < n:
            logits = model.forward([([out[-1]], seq)], kv)[0]
    return out


async def collect(eng, prompt, n, **kw):
    tokens, items = [], []
    async for item in eng.generate({"prompt_token_ids": prompt, "max_tokens": n, "ignore_eos": True, **kw}):
        tokens += item["token_ids"]
        items.append(item)
    return tokens, items


def prompt(n, start=3):
    return [(start + 7 * i) % CFG.vocab_size for i in range(n)]


def test_greedy_equals_model_single_and_batched(model):
    prompts = [prompt(40), prompt(9, 100), prompt(75, 200)]
    want = [greedy(model, p, 5) for p in prompts]
    eng = engine(model, batch_tokens=32)  # 32-token budget: the 75-token prompt is prefilled in chunks

    async def run():
        alone, items = await collect(eng, prompts[0], 5)
        together = await asyncio.gather(*(collect(eng, p, 5) for p in prompts))
        return alone, items, together

    alone, items, together = asyncio.run(run())
    assert alone == want[0]
    assert [t for t, _ in together] == want
    assert items[-1] == {"token_ids": [want[0][-1]], "finish_reason": "length", "num_prompt_tokens": 40,
                         "num_output_tokens": 5}
    s = eng.stats()
    assert s["num_steps"] < 5 + 3 * 5  # concurrent requests shared steps
    assert s["num_running"] == s["num_waiting"] == s["num_pages_in_use"] == s["num_state_slots_in_use"] == 0


def test_shared_prefix_skips_recompute_and_gives_the_same_tokens(model):
    base = prompt(140)
    a, b = base + [5, 6], base + [9]
    eng = engine(model, pages=8)

    async def run():
        first = await collect(eng, a, 3)
        return first, await collect(eng, b, 3)

    (ta, _), (tb, _) = asyncio.run(run())
    assert eng.stats()["prefix_cache_hits"] == 128  # b reused a's first page and state snapshot
    assert ta == greedy(model, a, 3) and tb == greedy(model, b, 3)


def test_preemption_under_kv_pressure_keeps_outputs_exact(model):
    # Two pages in all: two 100-token prompts fit, but both cannot grow past 128 tokens together.
    prompts = [prompt(100), prompt(100, 50)]
    eng = engine(model, pages=2, batch_tokens=256)

    async def run():
        return await asyncio.gather(*(collect(eng, p, 40) for p in prompts))

    out = asyncio.run(run())
    assert eng.stats()["num_preemptions"] >= 1
    assert [t for t, _ in out] == [greedy(model, p, 40) for p in prompts]


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
