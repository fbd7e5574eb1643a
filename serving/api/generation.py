"""API-neutral generation: engine token stream -> text, reasoning and tool-call events.

Both APIs build a `GenRequest`, stream `Event`s from `events()`, and format them their own way.
Order of work per engine item: incremental detokenization (`decode`, special tokens kept, so the chat parser
sees `</think>` and DSML markers) -> the chat output parser splits reasoning / content / tool calls
(and, with `skip_special_tokens`, special-token strings leave the text: `chat_bridge.SkipSpecial`)
-> text stop sequences are matched on the content and end the request early.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass
class TextDelta:
    text: str


@dataclass
class ReasoningDelta:
    text: str


@dataclass
class ToolCall:
    index: int
    id: str
    name: str
    arguments: str  # JSON object text


@dataclass
class Finished:
    reason: str  # "stop" | "length" | "stop_sequence" | "tool_calls" | "abort"
    prompt_tokens: int
    completion_tokens: int
    stop_sequence: str | None = None


Event = TextDelta | ReasoningDelta | ToolCall | Finished


class OutputParser(Protocol):
    """Splits generated text into reasoning, content and tool calls (see `chat_parser`)."""

    def feed(self, text: str) -> list[TextDelta | ReasoningDelta | ToolCall]: ...

    def close(self) -> list[TextDelta | ReasoningDelta | ToolCall]: ...


class PlainParser:
    """Raw completions: everything is content."""

    def feed(self, text: str) -> list[TextDelta | ReasoningDelta | ToolCall]:
        return [TextDelta(text)] if text else []

    def close(self) -> list[TextDelta | ReasoningDelta | ToolCall]:
        return []


class StopMatcher:
    """Finds the first text stop sequence in streamed content, holding back possible prefixes."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """Return (text safe to emit, the stop sequence hit or None)."""
        if not self.stops:
            return text, None
        buf = self._pending + text
        hits = [(buf.find(s), s) for s in self.stops if s in buf]
        if hits:
            pos, stop = min(hits)
            self._pending = ""
            return buf[:pos], stop
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        self._pending = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], None

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


@dataclass
class GenRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stop_token_ids: list[int] = field(default_factory=list)

    def engine_request(self) -> dict[str, Any]:
        p = self.params
        return {
            "request_id": self.request_id,
            "prompt_token_ids": self.prompt_token_ids,
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "seed": p.seed,
            "stop_token_ids": self.stop_token_ids,
            "ignore_eos": p.ignore_eos,
        }


def _stop_filter(evs: list, matcher: StopMatcher) -> tuple[list[Event], str | None]:
    """Pass parser events through the stop matcher (content only); cut at the first hit."""
    out: list[Event] = []
    for ev in evs:
        if not isinstance(ev, TextDelta):
            out.append(ev)
            continue
        text, hit = matcher.feed(ev.text)
        if text:
            out.append(TextDelta(text))
        if hit is not None:
            return out, hit
    return out, None


async def events(
    items: AsyncIterator[dict],
    decode: Callable[[list[int]], str],  # incremental: new ids -> the text they complete
    parser: OutputParser,
    stops: list[str],
    num_prompt_tokens: int,
) -> AsyncIterator[Event]:
    """Turn engine items into events; ends with exactly one `Finished`.

    Returns early (the caller then cancels the engine stream) when a stop sequence matches."""
    matcher = StopMatcher(stops)
    n_out, n_prompt = 0, num_prompt_tokens
    saw_tool = False
    reason = "abort"  # if the engine stream ends without a finish reason
    done = False
    while not done:
        item = await anext(items, None)
        if item is None:
            evs = parser.close()
            done = True
        else:
            n_out = item.get("num_output_tokens", n_out + len(item.get("token_ids", ())))
            n_prompt = item.get("num_prompt_tokens", n_prompt)
            text = decode(list(item.get("token_ids", ())))
            evs = parser.feed(text) if text else []
            if item.get("finish_reason"):
                reason = item["finish_reason"]
                evs += parser.close()
                done = True
        out, hit = _stop_filter(evs, matcher)
        for ev in out:
            saw_tool = saw_tool or isinstance(ev, ToolCall)
            yield ev
        if hit is not None:
            yield Finished("stop_sequence", n_prompt, n_out, stop_sequence=hit)
            return
    rest = matcher.flush()
    if rest:
        yield TextDelta(rest)
    if saw_tool and reason == "stop":
        reason = "tool_calls"
    yield Finished(reason, n_prompt, n_out)
