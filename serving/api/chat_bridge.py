"""The one place the ingress meets the tokenizer and the V4 chat format (`v4d.serving.chat`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from v4d.serving import chat
from v4d.serving.api.errors import APIError
from v4d.serving.api.generation import EventParser
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


def output_parser(parser: chat.Parser, tok: Tokenizer, skip_special_tokens: bool) -> EventParser:
    """`parser`'s events; with `skip_special_tokens` the parser still sees special tokens (`</think>`,
    DSML, EOS) but the client's text and reasoning do not."""
    return EventParser(parser, tok.strip_special if skip_special_tokens else None)
