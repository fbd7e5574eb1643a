"""Chat and completions through the real openai / anthropic SDKs against the real engine, model and shards."""

import asyncio

import httpx
import pytest

from v4d.serving import chat
from v4d.serving.tokenizer import Tokenizer

pytestmark = pytest.mark.ray

MODEL = "v4-tiny"
USER = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="session")
def tok(plan):
    return Tokenizer.from_file(plan.weights_uri)


def test_models_and_health(oai, base_url):
    assert [m.id for m in oai.models.list().data] == [MODEL]
    assert httpx.get(f"{base_url}/healthz").json()["status"] == "ok"


def test_openai_chat_non_streaming_and_streaming_agree(oai, tok):
    kw = dict(model=MODEL, messages=USER, max_tokens=12, temperature=0, extra_body={"thinking": {"type": "disabled"}})
    r = oai.chat.completions.create(**kw)
    choice = r.choices[0]
    prompt = chat.encode_messages(USER, thinking=False)
    assert r.usage.prompt_tokens == len(tok.encode_prompt(prompt))
    assert r.usage.completion_tokens == 12 and choice.finish_reason == "length"
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert choice.message.content and choice.message.role == "assistant"

    chunks = list(oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_thinking_mode_goes_to_reasoning_content(oai, anth):
    r = oai.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=8, temperature=0, extra_body={"thinking": {"type": "enabled"}}
    )
    # Random weights never close </think>: every generated token is reasoning.
    assert r.choices[0].message.model_extra["reasoning_content"] and not r.choices[0].message.content
    m = anth.messages.create(
        model=MODEL,
        max_tokens=8,
        messages=USER,
        extra_body={"temperature": 0},
        thinking={"type": "enabled", "budget_tokens": 1024},
    )
    assert [b.type for b in m.content] == ["thinking"]
    assert m.content[0].thinking == r.choices[0].message.model_extra["reasoning_content"]


def test_anthropic_messages_non_streaming_and_streaming_agree(anth, oai):
    kw = dict(model=MODEL, max_tokens=10, messages=USER, thinking={"type": "disabled"}, extra_body={"temperature": 0})
    m = anth.messages.create(**kw)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 10
    assert [b.type for b in m.content] == ["text"]
    with anth.messages.stream(**kw) as stream:
        deltas = [t for t in stream.text_stream]
        final = stream.get_final_message()
    assert "".join(deltas) == m.content[0].text == final.content[0].text
    assert final.usage.input_tokens == m.usage.input_tokens
    # Same prompt and greedy decoding through the OpenAI API: the same text.
    r = oai.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=10, temperature=0, extra_body={"thinking": {"type": "disabled"}}
    )
    assert r.choices[0].message.content == m.content[0].text
    assert (
        anth.messages.count_tokens(model=MODEL, messages=USER, thinking={"type": "disabled"}).input_tokens
        == m.usage.input_tokens
    )


def test_stop_sequences_cut_the_text(oai, anth):
    kw = dict(model=MODEL, prompt="The sea is", max_tokens=16, temperature=0)
    full = oai.completions.create(**kw).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = oai.completions.create(**kw, stop=[stop]).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    m = anth.messages.create(
        model=MODEL, max_tokens=16, messages=USER, thinking={"type": "disabled"}, extra_body={"temperature": 0}
    )
    text = m.content[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    m2 = anth.messages.create(
        model=MODEL,
        max_tokens=16,
        messages=USER,
        extra_body={"temperature": 0},
        thinking={"type": "disabled"},
        stop_sequences=[stop],
    )
    assert m2.stop_reason == "stop_sequence" and m2.stop_sequence == stop
    assert (m2.content[0].text if m2.content else "") == text[: text.index(stop)]


def test_seeded_sampling_is_reproducible(oai):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, top_p=0.9)
    a = oai.completions.create(**kw, seed=7).choices[0].text
    b = oai.completions.create(**kw, seed=7).choices[0].text
    others = {oai.completions.create(**kw, seed=s).choices[0].text for s in (8, 9, 10)}
    assert a == b and others - {a}


def test_concurrent_requests_are_batched_and_match_sequential_greedy(base_url, engine):
    import openai

    prompts = ["The sea is", "Mountains are", "A small cat", "In the city"]

    async def one(p):
        client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0)
        r = await client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0)
        return r.choices[0].text

    sequential = [asyncio.run(one(p)) for p in prompts]
    steps0 = engine.stats.remote().result()["num_steps"]

    async def together():
        return await asyncio.gather(*(one(p) for p in prompts))

    concurrent = asyncio.run(together())
    steps = engine.stats.remote().result()["num_steps"] - steps0
    assert concurrent == sequential
    # One at a time this takes >= 4 x 12 steps; batched, the four share steps.
    assert steps < 4 * 12 * 0.75, steps


def test_served_greedy_output_equals_in_process_model(oai, plan, tok):
    from v4d.serving.generate import generate
    from v4d.serving.model.loader import load_model

    ids = tok.encode("The sea is")
    served = oai.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0).choices[0].text
    model = load_model(plan.weights_uri, progress=False)
    local = generate(model, ids, max_new_tokens=10, eos_id=tok.eos_id)
    assert served == tok.decode(local.token_ids)


def test_client_disconnect_aborts_the_engine_request(oai, engine):
    import time

    stream = oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=400, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.time() + 20
    while engine.stats.remote().result()["num_running"] and time.time() < deadline:
        time.sleep(0.2)
    assert engine.stats.remote().result()["num_running"] == 0
