"""Pure protocol pieces: stop sequences, incremental decoding, and stream shapes checked with the SDKs' own types."""

import asyncio
import json

import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import TypeAdapter

from v4d.serving import errors as engine_errors
from v4d.serving.api import anthropic_api, openai_api
from v4d.serving.api.errors import APIError, engine_counted, error_kind, from_exception
from v4d.serving.api.generation import (
    EventParser,
    Finished,
    ReasoningDelta,
    StopMatcher,
    TextDelta,
    ToolCallDelta,
    events,
)
from v4d.serving.api.validation import parse_body
from v4d.serving.chat import PlainParser, ToolCall

EVENTS = [
    ReasoningDelta("think "),
    ReasoningDelta("more"),
    TextDelta("Hello"),
    TextDelta(" world"),
    ToolCallDelta(0, "call_1", ToolCall("get_weather", '{"city": "Paris"}')),
    ToolCallDelta(1, "call_2", ToolCall("get_time", "{}")),
    Finished("tool_calls", prompt_tokens=7, completion_tokens=12),
]


async def _aiter(items):
    for x in items:
        yield x


def _collect(agen):
    async def run():
        return [x async for x in agen]

    return asyncio.run(run())


def _sse_payloads(chunks):
    out = []
    for c in chunks:
        lines = dict(line.split(": ", 1) for line in c.strip().split("\n"))
        out.append((lines.get("event"), lines["data"]))
    return out


def test_stop_matcher_holds_back_prefixes_and_cuts_at_first_stop():
    m = StopMatcher(["STOP", "xyz"])
    assert m.feed("abc ST") == ("abc ", None)  # "ST" may start "STOP"
    assert m.feed("OP tail") == ("", "STOP")
    m = StopMatcher(["ab"])
    assert m.feed("xa") == ("x", None)
    assert m.feed("c") == ("ac", None)
    assert m.flush() == ""
    assert StopMatcher([]).feed("anything") == ("anything", None)


def test_events_apply_stop_sequences_and_report_usage():
    items = [
        {"token_ids": [1], "finish_reason": None, "num_prompt_tokens": 5, "num_output_tokens": 1},
        {"token_ids": [2], "finish_reason": None, "num_prompt_tokens": 5, "num_output_tokens": 2},
        {"token_ids": [3], "finish_reason": "length", "num_prompt_tokens": 5, "num_output_tokens": 3},
    ]
    words = {1: "one ", 2: "two ", 3: "three"}

    decode = lambda ids: "".join(words[i] for i in ids)  # noqa: E731  (ids -> new text)
    out = _collect(events(_aiter(items), decode, EventParser(PlainParser()), ["two"], 5))
    assert out == [TextDelta("one "), Finished("stop_sequence", 5, 2, stop_sequence="two")]
    out = _collect(events(_aiter(items), decode, EventParser(PlainParser()), [], 5))
    assert "".join(e.text for e in out[:-1]) == "one two three"
    assert out[-1] == Finished("length", 5, 3)


def test_openai_chat_shapes_parse_with_the_sdk_types():
    body = openai_api.chat_completion("chatcmpl-1", "m", EVENTS)
    cc = ChatCompletion.model_validate(body)
    msg = cc.choices[0].message
    assert msg.content == "Hello world" and msg.model_extra["reasoning_content"] == "think more"
    assert [t.function.name for t in msg.tool_calls] == ["get_weather", "get_time"]
    assert cc.choices[0].finish_reason == "tool_calls" and cc.usage.total_tokens == 19

    chunks = _collect(openai_api.chat_stream("chatcmpl-1", "m", _aiter(EVENTS), include_usage=True))
    payloads = [d for _, d in _sse_payloads(chunks)]
    assert payloads[-1] == "[DONE]"
    parsed = [ChatCompletionChunk.model_validate(json.loads(p)) for p in payloads[:-1]]
    assert parsed[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in parsed if c.choices)
    assert text == "Hello world"
    calls = [tc for c in parsed if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.index, tc.function.name) for tc in calls] == [(0, "get_weather"), (1, "get_time")]
    assert parsed[-2].choices[0].finish_reason == "tool_calls"
    assert parsed[-1].choices == [] and parsed[-1].usage.completion_tokens == 12


def test_openai_completion_shape():
    evs = [TextDelta("abc"), Finished("length", 3, 4)]
    c = Completion.model_validate(openai_api.completion("cmpl-1", "m", evs))
    assert c.choices[0].text == "abc" and c.choices[0].finish_reason == "length"


def test_anthropic_message_and_stream_accumulate_to_the_same_message():
    body = anthropic_api.message("msg_1", "m", EVENTS)
    msg = Message.model_validate(body)
    assert [b.type for b in msg.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert msg.content[2].input == {"city": "Paris"} and msg.stop_reason == "tool_use"
    assert msg.usage.input_tokens == 7 and msg.usage.output_tokens == 12

    chunks = _collect(anthropic_api.message_stream("msg_1", "m", 7, _aiter(EVENTS)))
    adapter = TypeAdapter(RawMessageStreamEvent)
    snapshot, bufs = None, {}
    for name, data in _sse_payloads(chunks):
        ev = adapter.validate_python(json.loads(data))
        assert ev.type == name
        snapshot = accumulate_event(event=ev, current_snapshot=snapshot, json_bufs=bufs)
    assert snapshot.model_dump(exclude_none=True) == msg.model_dump(exclude_none=True)


def test_validation_errors_name_the_field():
    with pytest.raises(APIError) as e:
        parse_body(b'{"model": "m"}', openai_api.ChatRequest)
    assert e.value.status == 400 and e.value.param == "messages"
    with pytest.raises(APIError) as e:
        parse_body(
            b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
            openai_api.ChatRequest,
        )
    assert e.value.param == "temperature" and "hot" in e.value.message
    with pytest.raises(APIError) as e:
        parse_body(
            b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "video"}]}]}',
            anthropic_api.MessagesRequest,
        )
    assert e.value.param.startswith("messages.0.content.0")
    with pytest.raises(APIError) as e:
        parse_body(b"{not json", openai_api.ChatRequest)
    assert "JSON" in e.value.message
    err = APIError(429, "busy", retry_after_s=2.4)
    assert err.headers() == {"Retry-After": "2"}
    assert err.anthropic_body() == {"type": "error", "error": {"type": "rate_limit_error", "message": "busy"}}
    assert set(err.openai_body()["error"]) == {"message", "type", "param", "code"}


def test_anthropic_request_converts_to_openai_shaped_conversation():
    raw = {
        "model": "m",
        "max_tokens": 10,
        "system": "be brief",
        "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "call it", "signature": ""},
                    {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}},
                ],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny"}]},
        ],
    }
    p = parse_body(json.dumps(raw).encode(), anthropic_api.MessagesRequest).validated().prompt()
    assert [m["role"] for m in p.messages] == ["system", "user", "assistant", "tool"]
    assert p.messages[2]["reasoning_content"] == "call it"
    assert json.loads(p.messages[2]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert p.messages[3] == {"role": "tool", "tool_call_id": "t1", "content": "sunny"}
    assert p.tools[0]["function"]["name"] == "get_weather" and p.thinking


class _Wrapped(Exception):
    """What a Ray handle raises: the replica's exception in `.cause`."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


@pytest.mark.parametrize(
    ("exc", "status", "kind", "counted_by_engine"),
    [
        (engine_errors.Overloaded(2.0), 429, None, True),  # a rejection (v4d:requests_rejected_total)
        (_Wrapped(engine_errors.ContextTooLong(4096, 5000)), 400, "context_too_long", True),
        (_Wrapped(engine_errors.ShardUnavailable("shard-1 down")), 503, "shard_unavailable", False),
        (APIError(400, "prompt too long", code="context_length_exceeded"), 400, "context_too_long", False),
        (APIError(401, "no key", code="invalid_api_key"), 401, "unauthorized", False),
        (APIError(404, "no model", code="model_not_found"), 404, "not_found", False),
        (TimeoutError(), 504, "timeout", False),
        (_Wrapped(type("ActorDiedError", (Exception,), {})()), 503, "unavailable", False),
        (_Wrapped(ZeroDivisionError("boom")), 500, "internal", False),
    ],
)
def test_errors_map_to_status_and_metric_kind(exc, status, kind, counted_by_engine):
    """The ingress answers `status` and counts `kind`, unless the engine already counted its own refusal."""
    err = from_exception(exc)
    assert err.status == status
    assert engine_counted(exc) is counted_by_engine
    if kind is not None:
        assert error_kind(err) == kind
