"""Anthropic-compatible shapes: /v1/messages (and /v1/messages/count_tokens).

Streams follow the Messages API event sequence the `anthropic` SDK accumulates: message_start,
then per content block content_block_start / content_block_delta (thinking_delta, text_delta,
input_json_delta) / content_block_stop, then message_delta (stop_reason, usage) and message_stop.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from pydantic import Field

from v4d.serving.api import sse
from v4d.serving.api.chat_bridge import ChatPrompt
from v4d.serving.api.errors import APIError
from v4d.serving.api.generation import Event, Finished, ReasoningDelta, TextDelta, ToolCallDelta
from v4d.serving.api.validation import MAX_TOOLS, Strict, check, check_stops
from v4d.serving.engine.sequence import SEED_MAX, SEED_MIN


class TextBlock(Strict):
    type: Literal["text"]
    text: str


class ThinkingBlock(Strict):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(Strict):
    type: Literal["redacted_thinking"]
    data: str


class ToolUseBlock(Strict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(Strict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(b.text for b in self.content)
        return self.content or ""


class ImageBlock(Strict):
    type: Literal["image", "document"]


Block = Annotated[
    TextBlock | ThinkingBlock | RedactedThinkingBlock | ToolUseBlock | ToolResultBlock | ImageBlock,
    Field(discriminator="type"),
]


class Message(Strict):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(Strict):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(Strict):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=1024)  # Anthropic's minimum; validated, not applied


class CountTokensRequest(Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None

    def validated(self) -> CountTokensRequest:
        for i, m in enumerate(self.messages):
            for j, b in enumerate(m.content if isinstance(m.content, list) else []):
                check(
                    not isinstance(b, ImageBlock),
                    f"messages.{i}.content.{j}",
                    f"'{b.type}' blocks are not supported (text-only model)",
                )
                if m.role == "user":
                    check(
                        not isinstance(b, (ToolUseBlock, ThinkingBlock)),
                        f"messages.{i}.content.{j}",
                        f"'{b.type}' blocks belong to assistant turns",
                    )
                else:
                    check(
                        not isinstance(b, ToolResultBlock),
                        f"messages.{i}.content.{j}",
                        "'tool_result' blocks belong to user turns",
                    )
        return self

    def prompt(self) -> ChatPrompt:
        messages: list[dict[str, Any]] = []
        if self.system:
            system = self.system if isinstance(self.system, str) else "".join(b.text for b in self.system)
            messages.append({"role": "system", "content": system})
        for m in self.messages:
            blocks = [TextBlock(type="text", text=m.content)] if isinstance(m.content, str) else m.content
            if m.role == "user":
                text: list[str] = []
                for b in blocks:
                    if isinstance(b, ToolResultBlock):
                        messages.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text()})
                    elif isinstance(b, TextBlock):
                        text.append(b.text)
                if text:
                    messages.append({"role": "user", "content": "".join(text)})
                continue
            msg: dict[str, Any] = {
                "role": "assistant",
                "content": "".join(b.text for b in blocks if isinstance(b, TextBlock)),
            }
            reasoning = "".join(b.thinking for b in blocks if isinstance(b, ThinkingBlock))
            if reasoning:
                msg["reasoning_content"] = reasoning
            calls = [
                {"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input)}}
                for b in blocks
                if isinstance(b, ToolUseBlock)
            ]
            if calls:
                msg["tool_calls"] = calls
            messages.append(msg)
        tools = None
        if self.tools and not (self.tool_choice and self.tool_choice.type == "none"):
            tools = [
                {
                    "type": "function",
                    "function": {"name": t.name, "description": t.description or "", "parameters": t.input_schema},
                }
                for t in self.tools
            ]
        thinking = self.thinking is None or self.thinking.type != "disabled"
        return ChatPrompt(messages, tools, thinking, None)


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)  # accepted, not applied
    stream: bool = False
    metadata: dict[str, Any] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)  # not Anthropic's; honoured when sent
    skip_special_tokens: bool = True  # as on the OpenAI endpoints (not in Anthropic's API)

    def validated(self) -> MessagesRequest:
        super().validated()
        check_stops(self.stop_sequences or [], "stop_sequences")
        return self


# -- responses -------------------------------------------------------------------------------

STOP_REASON = {"stop": "end_turn", "stop_sequence": "stop_sequence", "length": "max_tokens", "tool_calls": "tool_use"}


def _input(tc: ToolCallDelta) -> dict[str, Any]:
    try:
        value = json.loads(tc.call.arguments or "{}")
    except ValueError:
        return {"_raw": tc.call.arguments}
    return value if isinstance(value, dict) else {"value": value}


def message(rid: str, model: str, evs: list[Event]) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    for ev in evs:
        last = content[-1] if content else None
        if isinstance(ev, ReasoningDelta):
            if last and last["type"] == "thinking":
                last["thinking"] += ev.text
            else:
                content.append({"type": "thinking", "thinking": ev.text, "signature": ""})
        elif isinstance(ev, TextDelta):
            if last and last["type"] == "text":
                last["text"] += ev.text
            else:
                content.append({"type": "text", "text": ev.text})
        elif isinstance(ev, ToolCallDelta):
            content.append({"type": "tool_use", "id": ev.id, "name": ev.call.name, "input": _input(ev)})
    fin = evs[-1]
    assert isinstance(fin, Finished)
    return {
        "id": rid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": STOP_REASON[fin.reason],
        "stop_sequence": fin.stop_sequence,
        "usage": {"input_tokens": fin.prompt_tokens, "output_tokens": fin.completion_tokens},
    }


async def message_stream(rid: str, model: str, prompt_tokens: int, evs: AsyncIterator[Event]) -> AsyncIterator[str]:
    start = {
        "id": rid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": prompt_tokens, "output_tokens": 0},
    }
    yield sse.event({"type": "message_start", "message": start}, "message_start")
    index = -1
    open_kind: str | None = None

    def stop_block() -> str:
        return sse.event({"type": "content_block_stop", "index": index}, "content_block_stop")

    def start_block(block: dict[str, Any]) -> str:
        return sse.event({"type": "content_block_start", "index": index, "content_block": block}, "content_block_start")

    def delta(d: dict[str, Any]) -> str:
        return sse.event({"type": "content_block_delta", "index": index, "delta": d}, "content_block_delta")

    async for ev in evs:
        if isinstance(ev, Finished):
            if open_kind:
                yield stop_block()
            yield sse.event(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": STOP_REASON[ev.reason], "stop_sequence": ev.stop_sequence},
                    "usage": {"output_tokens": ev.completion_tokens},
                },
                "message_delta",
            )
            yield sse.event({"type": "message_stop"}, "message_stop")
            return
        kind = "thinking" if isinstance(ev, ReasoningDelta) else "text" if isinstance(ev, TextDelta) else "tool_use"
        if kind != open_kind or kind == "tool_use":
            if open_kind:
                yield stop_block()
            index += 1
            open_kind = kind
            if isinstance(ev, ToolCallDelta):
                yield start_block({"type": "tool_use", "id": ev.id, "name": ev.call.name, "input": {}})
            else:
                yield start_block(
                    {"type": "thinking", "thinking": "", "signature": ""}
                    if kind == "thinking"
                    else {"type": "text", "text": ""}
                )
        if isinstance(ev, ReasoningDelta):
            yield delta({"type": "thinking_delta", "thinking": ev.text})
        elif isinstance(ev, TextDelta):
            yield delta({"type": "text_delta", "text": ev.text})
        else:
            yield delta({"type": "input_json_delta", "partial_json": json.dumps(_input(ev))})


def stream_error(err: APIError) -> str:
    return sse.event(err.anthropic_body(), "error")
