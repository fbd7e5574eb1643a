"""The one place the ingress meets the tokenizer and the V4 chat format (`v4d.serving.chat`)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from v4d.serving import chat
from v4d.serving.api.errors import APIError
from v4d.serving.api.generation import ReasoningDelta, TextDelta, ToolCall
from v4d.serving.tokenizer import Tokenizer


@dataclass
class ChatPrompt:
    """A conversation in OpenAI message shape (both APIs convert into it), ready to encode."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    thinking: bool
    reasoning_effort: str | None = None
    response_format: dict[str, Any] | None = None


def render_prompt(prompt: ChatPrompt) -> str:
    """The conversation as V4 chat-format text (special tokens as their strings)."""
    try:
        return chat.encode_messages(
            prompt.messages, prompt.tools, prompt.thinking, prompt.reasoning_effort, prompt.response_format
        )
    except chat.ChatFormatError as e:
        raise APIError(400, str(e), param=e.param.replace("[", ".").replace("]", "")) from None


def decoder(tok: Tokenizer) -> Callable[[list[int]], str]:
    """Incremental detokenizer for one request: new ids -> the text they complete (specials kept)."""
    stream = tok.stream()
    return lambda ids: "".join(stream.step(tok.raw, i) or "" for i in ids)


class ChatOutputParser:
    """`chat.OutputParser` (reasoning / content / DSML tool calls) as generation events."""

    def __init__(self, thinking: bool):
        self._parser = chat.OutputParser(thinking)
        self._calls = 0

    def _events(self, parsed: list[tuple[str, Any]]) -> list[TextDelta | ReasoningDelta | ToolCall]:
        out: list[TextDelta | ReasoningDelta | ToolCall] = []
        for kind, value in parsed:
            if kind == "reasoning":
                out.append(ReasoningDelta(value))
            elif kind == "content":
                out.append(TextDelta(value))
            else:
                out.append(ToolCall(self._calls, f"call_{uuid.uuid4().hex[:24]}", value.name, value.arguments))
                self._calls += 1
        return out

    def feed(self, text: str) -> list[TextDelta | ReasoningDelta | ToolCall]:
        return self._events(self._parser.feed(text))

    def close(self) -> list[TextDelta | ReasoningDelta | ToolCall]:
        return self._events(self._parser.finish())
