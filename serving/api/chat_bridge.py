"""The one place the ingress meets the tokenizer and the V4 chat format (`v4d.serving.chat`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ChatPrompt:
    """A conversation in OpenAI message shape (both APIs convert into it), ready to encode."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    thinking: bool
    reasoning_effort: str | None = None
