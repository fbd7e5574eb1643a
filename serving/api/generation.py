"""API-neutral generation: engine token stream -> text, reasoning and tool-call events.

Both APIs build a `GenRequest`, stream `Event`s from `events()`, and format them their own way.
Order of work per engine item: incremental detokenization (`decode`, special tokens kept, so the chat parser
sees `</think>` and DSML markers) -> the output parser (`chat.OutputParser`, or `chat.PlainParser` for raw
completions, through `EventParser`) splits reasoning / content / tool calls (and, with
`skip_special_tokens`, special-token strings leave the text) -> text stop sequences are matched on the
content and end the request early.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from v4d.serving.chat import Parser, ToolCall
from v4d.serving.engine.sequence import SamplingParams


@dataclass
class TextDelta:
    text: str


@dataclass
class ReasoningDelta:
    text: str


@dataclass
class ToolCallDelta:
    """One complete tool call the model made, numbered in order with the id the client answers it by."""

    index: int
    id: str
    call: ToolCall


@dataclass
class Finished:
    reason: str  # "stop" | "length" | "stop_sequence" | "tool_calls" | "abort"
    prompt_tokens: int
    completion_tokens: int
    stop_sequence: str | None = None


Delta = TextDelta | ReasoningDelta | ToolCallDelta
Event = Delta | Finished


class EventParser:
    """A `chat.Parser` (reasoning / content / DSML tool calls, or plain text) as generation events.

    `strip` (`skip_special_tokens`: the tokenizer's `strip_special`) removes special-token strings
    from the client's text and reasoning after the parser has seen them."""

    def __init__(self, parser: Parser, strip: Callable[[str], str] | None = None):
        self._parser, self._strip = parser, strip
        self._calls = 0

    def _events(self, parsed: list[tuple[str, Any]]) -> list[Delta]:
        out: list[Delta] = []
        for kind, value in parsed:
            if kind == "tool_call":
                out.append(ToolCallDelta(self._calls, f"call_{uuid.uuid4().hex[:24]}", value))
                self._calls += 1
                continue
            text = self._strip(value) if self._strip else value
            if text:
                out.append(ReasoningDelta(text) if kind == "reasoning" else TextDelta(text))
        return out

    def feed(self, text: str) -> list[Delta]:
        return self._events(self._parser.feed(text))

    def finish(self) -> list[Delta]:
        return self._events(self._parser.finish())


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
    params: SamplingParams  # the engine's (stop_token_ids included)
    stop: list[str] = field(default_factory=list)  # text stop sequences, matched here on the content

    def engine_request(self) -> dict[str, Any]:
        """The engine request (docs/contracts.md) carrying `params` field for field."""
        return {
            "request_id": self.request_id,
            "prompt_token_ids": self.prompt_token_ids,
            **asdict(self.params),
            "stop_token_ids": list(self.params.stop_token_ids),
        }


def _stop_filter(evs: list[Delta], matcher: StopMatcher) -> tuple[list[Event], str | None]:
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
    items: AsyncIterator[dict[str, Any]],
    decode: Callable[[list[int]], str],  # incremental: new ids -> the text they complete
    parser: EventParser,
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
            evs = parser.finish()
            done = True
        else:
            n_out = item.get("num_output_tokens", n_out + len(item.get("token_ids", ())))
            n_prompt = item.get("num_prompt_tokens", n_prompt)
            text = decode(list(item.get("token_ids", ())))
            evs = parser.feed(text) if text else []
            if item.get("finish_reason"):
                reason = item["finish_reason"]
                evs += parser.finish()
                done = True
        out, hit = _stop_filter(evs, matcher)
        for ev in out:
            saw_tool = saw_tool or isinstance(ev, ToolCallDelta)
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
