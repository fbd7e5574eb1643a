"""Server-sent events as the OpenAI and Anthropic SDKs parse them."""

from __future__ import annotations

import json
from typing import Any


def event(data: Any, name: str | None = None) -> str:
    """One SSE event. OpenAI streams are data-only and end with `data: [DONE]`; Anthropic names
    every event (`event: message_start` ...) and its SDK skips events without a name."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {payload}\n\n"


DONE = event("[DONE]")
