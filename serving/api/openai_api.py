"""OpenAI-compatible shapes: /v1/chat/completions, /v1/completions, /v1/models.

Requests are pydantic models (validated strictly, errors as 400 naming the field); responses and
stream chunks are plain dicts in the shapes the `openai` SDK parses: `chat.completion`,
`chat.completion.chunk` (delta with role / content / reasoning_content / tool_calls), `text_completion`,
a final usage chunk when `stream_options.include_usage`, and `data: [DONE]`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import Field

from v4d.serving.api import sse
from v4d.serving.api.chat_bridge import ChatPrompt
from v4d.serving.api.errors import APIError
from v4d.serving.api.generation import Event, Finished, ReasoningDelta, TextDelta, ToolCallDelta
from v4d.serving.api.validation import MAX_TOOLS, Strict, check, check_stops
from v4d.serving.engine.sequence import SEED_MAX, SEED_MIN


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str


class ToolCallIn(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class FunctionDef(Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class Thinking(Strict):
    type: Literal["enabled", "disabled"]


class StreamOptions(Strict):
    include_usage: bool = False


class _Sampling(Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)  # what torch.Generator takes
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)  # accepted, not applied
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)  # accepted, not applied
    user: str | None = None
    ignore_eos: bool = False  # vLLM extension: generate max_tokens even past EOS (benchmarks)
    skip_special_tokens: bool = True  # vLLM extension: false keeps special tokens in the returned text

    def stops(self) -> list[str]:
        return check_stops([self.stop] if isinstance(self.stop, str) else list(self.stop or []), "stop")

    def check_common(self) -> None:
        check(self.n == 1, "n", "only n=1 is supported")
        check(self.stream or self.stream_options is None, "stream_options", "only allowed when stream is true")
        self.stops()


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    thinking: Thinking | None = None
    reasoning_effort: Literal["low", "medium", "high", "max", "xhigh"] | None = None
    logprobs: bool | None = None
    response_format: dict[str, Any] | None = None

    def validated(self) -> ChatRequest:
        self.check_common()
        check(not self.logprobs, "logprobs", "log probabilities are not supported")
        for i, m in enumerate(self.messages):
            if m.role == "tool":
                check(bool(m.tool_call_id), f"messages.{i}.tool_call_id", "required for role 'tool'")
            if m.role in ("user", "system", "developer"):
                check(m.content is not None, f"messages.{i}.content", f"required for role '{m.role}'")
            for j, tc in enumerate(m.tool_calls or []):
                try:
                    json.loads(tc.function.arguments or "{}")
                except ValueError:
                    raise APIError(
                        400,
                        f"messages.{i}.tool_calls.{j}.function.arguments: not valid JSON",
                        param=f"messages.{i}.tool_calls.{j}.function.arguments",
                    ) from None
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def max_tokens_param(self) -> str:
        """The field the client limited the output with (errors name it)."""
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"

    def prompt(self) -> ChatPrompt:
        messages: list[dict[str, Any]] = []
        for m in self.messages:
            msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.reasoning_content:
                msg["reasoning_content"] = m.reasoning_content
            if m.tool_calls:
                msg["tool_calls"] = [
                    {
                        "id": tc.id,
                        "type": "function",
                        "function": {"name": tc.function.name, "arguments": tc.function.arguments},
                    }
                    for tc in m.tool_calls
                ]
            if m.tool_call_id:
                msg["tool_call_id"] = m.tool_call_id
            messages.append(msg)
        tools = None
        if self.tools and self.tool_choice != "none":
            tools = [t.model_dump(exclude_none=True) for t in self.tools]
        thinking = self.thinking is None or self.thinking.type == "enabled"
        fmt = self.response_format if self.response_format and self.response_format.get("type") != "text" else None
        return ChatPrompt(messages, tools, thinking, self.reasoning_effort, fmt)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def validated(self) -> CompletionRequest:
        self.check_common()
        check(self.best_of in (None, 1), "best_of", "only best_of=1 is supported")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            check(len(self.prompt) == 1, "prompt", "only one prompt per request is supported")
        check(not self.echo, "echo", "echo is not supported")
        check(self.logprobs is None, "logprobs", "log probabilities are not supported")
        check(self.suffix is None, "suffix", "suffix (fill-in-the-middle) is not supported")
        check(self.prompt != [] and self.prompt != "", "prompt", "must not be empty")
        return self

    def text_or_ids(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            return str(self.prompt[0])
        return self.prompt  # type: ignore[return-value]


# -- responses -------------------------------------------------------------------------------

FINISH = {"stop": "stop", "stop_sequence": "stop", "length": "length", "tool_calls": "tool_calls"}


def usage(fin: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": fin.prompt_tokens,
        "completion_tokens": fin.completion_tokens,
        "total_tokens": fin.prompt_tokens + fin.completion_tokens,
    }


def tool_call_dict(tc: ToolCallDelta) -> dict[str, Any]:
    return {"id": tc.id, "type": "function", "function": {"name": tc.call.name, "arguments": tc.call.arguments}}


def models_list(served_name: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": served_name, "object": "model", "created": created, "owned_by": "v4d"}]}


def chat_completion(rid: str, model: str, evs: list[Event]) -> dict[str, Any]:
    text = "".join(e.text for e in evs if isinstance(e, TextDelta))
    reasoning = "".join(e.text for e in evs if isinstance(e, ReasoningDelta))
    calls = [tool_call_dict(e) for e in evs if isinstance(e, ToolCallDelta)]
    fin = evs[-1]
    assert isinstance(fin, Finished)
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": FINISH[fin.reason]}],
        "usage": usage(fin),
    }


async def chat_stream(rid: str, model: str, evs: AsyncIterator[Event], include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        body: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            body["usage"] = None
        return sse.event(body)

    yield chunk({"role": "assistant", "content": ""})
    n_calls = 0
    async for ev in evs:
        if isinstance(ev, TextDelta):
            yield chunk({"content": ev.text})
        elif isinstance(ev, ReasoningDelta):
            yield chunk({"reasoning_content": ev.text})
        elif isinstance(ev, ToolCallDelta):
            yield chunk({"tool_calls": [{"index": n_calls, **tool_call_dict(ev)}]})
            n_calls += 1
        else:
            yield chunk({}, FINISH[ev.reason])
            if include_usage:
                body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
                yield sse.event({**body, "choices": [], "usage": usage(ev)})
    yield sse.DONE


def completion(rid: str, model: str, evs: list[Event]) -> dict[str, Any]:
    fin = evs[-1]
    assert isinstance(fin, Finished)
    text = "".join(e.text for e in evs if isinstance(e, TextDelta))
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": FINISH[fin.reason]}],
        "usage": usage(fin),
    }


async def completion_stream(rid: str, model: str, evs: AsyncIterator[Event], include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())
    base = {"id": rid, "object": "text_completion", "created": created, "model": model}
    async for ev in evs:
        if isinstance(ev, TextDelta):
            choice = {"index": 0, "text": ev.text, "logprobs": None, "finish_reason": None}
            yield sse.event({**base, "choices": [choice]})
        elif isinstance(ev, Finished):
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": FINISH[ev.reason]}
            yield sse.event({**base, "choices": [choice]})
            if include_usage:
                yield sse.event({**base, "choices": [], "usage": usage(ev)})
    yield sse.DONE


def stream_error(err: APIError) -> str:
    """An error after the stream started: the SDK raises APIError on a data event with `error`."""
    return sse.event(err.openai_body())
