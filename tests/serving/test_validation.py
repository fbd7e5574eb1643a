"""The validation layer in-process (no server): hostile bodies become 4xx naming the field, never a crash.

The same corpus runs against the real app in test_hostile.py; here it runs through `Preparer`, the
code the ingress runs in its thread pool, so a failure points at the validation code directly.
"""

import json
import time

import pytest
from helpers.fuzz_corpus import ANTHROPIC, corpus

from v4d.serving import errors as engine_errors
from v4d.serving.api.errors import APIError, from_exception
from v4d.serving.api.prepare import Preparer
from v4d.serving.api.validation import MAX_JSON_DEPTH, MAX_STOP, read_json
from v4d.serving.engine.sequence import SEED_MAX, SEED_MIN, SamplingParams
from v4d.serving.tokenizer import Tokenizer

MODEL = "v4-tiny"
USER = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def prep():
    return Preparer(MODEL, 1024, Tokenizer.train(1024))


def _endpoint(prep, path):
    return {
        "/v1/chat/completions": prep.chat,
        "/v1/completions": prep.completion,
        "/v1/messages": prep.messages,
        "/v1/messages/count_tokens": prep.count_tokens,
    }[path]


def _error(fn, body) -> APIError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8", "surrogatepass")
    with pytest.raises(APIError) as e:
        fn(raw)
    return e.value


def test_corpus_gives_only_4xx_naming_the_broken_field(prep):
    cases = [c for c in corpus() if c[0] == "POST" and c[1] in ANTHROPIC + ("/v1/chat/completions", "/v1/completions")]
    assert len(cases) >= 200
    outcomes = {"ok": 0, "4xx": 0}
    for _, path, body, field in cases:
        try:
            _endpoint(prep, path)(body)
            outcomes["ok"] += 1
        except APIError as err:
            assert 400 <= err.status < 500, (path, body[:200], err)
            assert len(err.message) < 400, err.message[:200]  # input is quoted as a short prefix only
            err.message.encode("utf-8")  # always encodable
            named = err.param and field and err.code != "context_length_exceeded"
            assert not named or err.param.split(".")[0] == field, (path, field, err)
            outcomes["4xx"] += 1
    assert outcomes["4xx"] > 0.8 * len(cases), outcomes


def test_json_is_bounded_and_valid_unicode():
    deep = b'{"metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert _error(read_json, deep).status == 400
    too_deep = b'{"metadata": ' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}"
    assert _error(read_json, too_deep).param == "metadata"
    read_json(b'{"metadata": ' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}")
    for raw in (b'{"a": NaN}', b'{"a": -Infinity}', b'{"a": 1e999}', b"[1]", b"\xc3\x28"):
        assert _error(read_json, raw).status == 400
    err = _error(read_json, b'{"messages": [{"content": "hi \\ud800"}]}')
    assert err.param == "messages.0.content" and "surrogate" in err.message
    assert read_json(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}  # a valid pair is fine


def test_seeds_are_what_a_generator_takes(prep):
    for fn, base in (
        (prep.chat, {"model": MODEL, "messages": USER, "max_tokens": 1}),
        (prep.completion, {"model": MODEL, "prompt": "hi", "max_tokens": 1}),
        (prep.messages, {"model": MODEL, "messages": USER, "max_tokens": 1}),
    ):
        for ok in (SEED_MIN, SEED_MAX, 0):
            assert fn(json.dumps({**base, "seed": ok}).encode())[-1].params.seed == ok
        for bad in (SEED_MAX + 1, SEED_MIN - 1, -(2**64), 2**70):
            assert _error(fn, {**base, "seed": bad}).param == "seed"


def test_limits_and_unsupported_options(prep):
    chat = {"model": MODEL, "messages": USER, "max_tokens": 1}
    msgs = {"model": MODEL, "messages": USER, "max_tokens": 1}
    assert _error(prep.chat, {**chat, "stop": ["s"] * (MAX_STOP + 1)}).param == "stop"
    assert _error(prep.chat, {**chat, "stop": ["x" * 300]}).param == "stop.0"
    assert _error(prep.messages, {**msgs, "stop_sequences": ["s"] * 1000}).param == "stop_sequences"
    assert (
        _error(prep.messages, {**msgs, "thinking": {"type": "enabled", "budget_tokens": -1}}).param
        == "thinking.budget_tokens"
    )
    prep.messages(json.dumps({**msgs, "thinking": {"type": "enabled", "budget_tokens": 1024}}).encode())
    assert _error(prep.completion, {"model": MODEL, "prompt": "hi", "best_of": 2}).param == "best_of"
    assert (
        _error(prep.chat, {**chat, "tools": [{"type": "function", "function": {"name": "f"}}] * 129}).param == "tools"
    )


def test_errors_name_the_field_the_client_sent(prep):
    long = "word " * 1200
    err = _error(prep.completion, {"model": MODEL, "prompt": long, "max_tokens": 1})
    assert (err.param, err.code) == ("prompt", "context_length_exceeded")
    err = _error(prep.chat, {"model": MODEL, "messages": USER, "max_completion_tokens": 5000})
    assert err.param == "max_completion_tokens"
    assert from_exception(engine_errors.ContextTooLong(10, 20), "prompt").param == "prompt"
    err = _error(prep.chat, {"model": "m" * 1_000_000, "messages": USER})
    assert err.status == 404 and len(err.message) < 200
    assert _error(prep.chat, {"model": "v4-tiny\ud800", "messages": USER}).param == "model"
    assert (
        _error(prep.messages, {**{"model": MODEL, "messages": USER, "max_tokens": 1}, "system": "\ud800"}).param
        == "system"
    )


def test_a_prompt_certainly_over_the_context_is_refused_before_tokenizing(prep):
    body = json.dumps({"model": MODEL, "prompt": "The sea is wide. " * 600_000, "max_tokens": 1}).encode()  # 10 MB
    t = time.perf_counter()
    err = _error(prep.completion, body)
    assert err.code == "context_length_exceeded" and time.perf_counter() - t < 2.0


def test_ignore_eos_drops_the_end_of_sentence_stop(prep):
    base = {"model": MODEL, "prompt": "The sea", "max_tokens": 4}
    assert prep.completion(json.dumps(base).encode())[1].engine_request()["stop_token_ids"] == [prep.tok.eos_id]
    gen = prep.completion(json.dumps({**base, "ignore_eos": True}).encode())[1]
    assert gen.params.stop_token_ids == () and gen.engine_request()["ignore_eos"] is True


def test_an_omitted_temperature_is_the_apis_default_and_the_engine_request_carries_it(prep):
    """HTTP requests default to temperature 1.0 (OpenAI, Anthropic); an engine request without one is greedy."""
    base = {"model": MODEL, "prompt": "The sea", "max_tokens": 4, "stop": ["x"]}
    gen = prep.completion(json.dumps(base).encode())[1]
    req = gen.engine_request()
    assert req["temperature"] == 1.0 and gen.stop == ["x"] and "stop" not in req
    assert SamplingParams.from_request(req) == gen.params
    assert SamplingParams.from_request({"prompt_token_ids": [1]}).temperature == 0.0


def test_tokenizing_a_big_prompt_leaves_the_event_loop_running(prep):
    """What the ingress does: prepare in a worker thread; the loop must keep ticking (the GIL is released)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    text = "The sea is wide and deep and full of fish. " * 25_000  # 1.1 MB
    raw = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": text}]}).encode()

    async def run():
        loop = asyncio.get_running_loop()
        t = time.perf_counter()
        job = loop.run_in_executor(ThreadPoolExecutor(1), prep.count_tokens, raw)
        worst = 0.0
        while not job.done():
            tick = time.perf_counter()
            await asyncio.sleep(0.01)
            worst = max(worst, time.perf_counter() - tick - 0.01)
        return await job, time.perf_counter() - t, worst

    n, seconds, worst = asyncio.run(run())
    assert n > 200_000
    assert worst < 0.5 * seconds, (worst, seconds)  # a held GIL stalls the loop for the whole encode
