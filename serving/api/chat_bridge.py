"""The one place the ingress meets the tokenizer and the V4 chat format (`v4d.serving.chat`)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from v4d.serving import chat
from v4d.serving.api.errors import APIError
from v4d.serving.api.generation import OutputParser, ReasoningDelta, TextDelta, ToolCall
from v4d.serving.tokenizer import Tokenizer


@dataclass
class ChatPrompt:
    """A conversation in OpenAI message shape (both APIs convert into it), ready to encode."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    thinking: bool
    reasoning_effort: str | None = None
    response_format: dict[str, Any] | None = None


def render_prompt(prompt: ChatPrompt) -> chat.Prompt:
    """The conversation in V4 chat format: template markers (special) and client text (plain)."""
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


class SkipSpecial:
    """`skip_special_tokens`: the wrapped parser sees special tokens (`</think>`, DSML, EOS), the
    client's text does not: special-token strings are removed from its text and reasoning events."""

    def __init__(self, parser: OutputParser, tok: Tokenizer):
        self._parser = parser
        self._tok = tok

    def _strip(self, evs: list[TextDelta | ReasoningDelta | ToolCall]) -> list[TextDelta | ReasoningDelta | ToolCall]:
        out: list[TextDelta | ReasoningDelta | ToolCall] = []
        for ev in evs:
            if isinstance(ev, (TextDelta, ReasoningDelta)):
                ev = type(ev)(self._tok.strip_special(ev.text))
                if not ev.text:
                    continue
            out.append(ev)
        return out

    def feed(self, text: str) -> list[TextDelta | ReasoningDelta | ToolCall]:
        return self._strip(self._parser.feed(text))

    def close(self) -> list[TextDelta | ReasoningDelta | ToolCall]:
        return self._strip(self._parser.close())


def output_parser(parser: OutputParser, tok: Tokenizer, skip_special_tokens: bool) -> OutputParser:
    return SkipSpecial(parser, tok) if skip_special_tokens else parser
