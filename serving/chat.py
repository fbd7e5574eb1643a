"""DeepSeek-V4 chat format: prompt encoding and output parsing (docs/deepseek-v4.md §8).

V4 ships no Jinja template; its `encoding` module defines the format, which this follows:

    <｜begin▁of▁sentence｜>{system}[\\n\\n## Tools ...]<｜User｜>{user}<｜Assistant｜><think>
    {reasoning}</think>{content}\\n\\n<｜DSML｜tool_calls>...</｜DSML｜tool_calls><｜end▁of▁sentence｜>

- Thinking mode pre-fills `<think>` after the last user turn, chat mode `</think>`.
- Without tools, reasoning of assistant turns before the last user message is dropped; with tools
  (anywhere in the conversation) all reasoning is kept and every turn opens with `<think>`.
- Tool results have no role of their own: they join the next user turn as `<tool_result>` blocks,
  in the order of the calls.
- Tool calls are DSML: one `invoke` per call, `parameter` elements with `string="true"` (verbatim
  text) or `string="false"` (a JSON value).

`encode_messages` renders OpenAI-style messages as a `Prompt`: the template's own markers are
`Special` pieces (encoded as special tokens), everything a client wrote is plain text (encoded as
ordinary tokens even where it spells `<｜User｜>` or `</think>`), so a message cannot forge a turn,
a tool call or the end of thinking. `parse_output` and the streaming `OutputParser` split generated
text into reasoning, content and tool calls.
"""

from __future__ import annotations

import copy
import json
import re
import string
from dataclasses import dataclass
from typing import Any

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
DSML = "｜DSML｜"
LATEST_REMINDER = "<｜latest_reminder｜>"
# BOS and EOS first: the tokenizer gives these the config's ids 0 and 1.
SPECIAL_TOKENS = [BOS, EOS, USER, ASSISTANT, THINK, END_THINK, DSML, LATEST_REMINDER]

TOOLS_OPEN = f"<{DSML}tool_calls>"
TOOLS_CLOSE = f"</{DSML}tool_calls>"
INVOKE_CLOSE = f"</{DSML}invoke>"
# Template text with {fields} for client text (see `_fill`).
INVOKE_OPEN = f'<{DSML}invoke name="{{name}}">\n'
PARAMETER = f'<{DSML}parameter name="{{name}}" string="{{is_str}}">{{value}}</{DSML}parameter>'

# Prepended to the first message in thinking mode at the highest effort ("Think Max").
REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)
# API effort names -> whether the Think-Max preamble applies (low/medium run as high, xhigh as max).
EFFORTS = {"low": False, "medium": False, "high": False, "xhigh": True, "max": True}

TOOLS_TEMPLATE = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<{dsml}tool_calls>" block like the following:

<{dsml}tool_calls>
<{dsml}invoke name="$TOOL_NAME">
<{dsml}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml}parameter>
...
</{dsml}invoke>
<{dsml}invoke name="$TOOL_NAME2">
...
</{dsml}invoke>
</{dsml}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {think}), you MUST output your complete reasoning inside {think}...{end_think} BEFORE any tool calls or final response.

Otherwise, output directly after {end_think} with tool calls or final response.

### Available Tool Schemas

{schemas}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
""".format(dsml=DSML, think=THINK, end_think=END_THINK, schemas="{schemas}")  # {schemas}: client text
RESPONSE_FORMAT_TEMPLATE = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"


class ChatFormatError(ValueError):
    """A message list the V4 format cannot express; `param` is the offending field path."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


class Special(str):
    """A special token the template writes; every other piece of a `Prompt` is plain text."""


@dataclass(frozen=True)
class Prompt:
    """A rendered chat prompt: `Special` markers and plain text (all client text), in order."""

    pieces: tuple[str, ...]

    @property
    def text(self) -> str:
        """The prompt as V4's encoder writes it (special tokens as their strings)."""
        return "".join(self.pieces)


_SPECIAL = re.compile("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")")


def _fill(template: str, **fields: str) -> list[str]:
    """Pieces of the format's own text (its special-token strings become `Special`), with each
    {field} filled by plain text. Client text must only ever enter a prompt through fields."""
    pieces: list[str] = []
    for literal, field, _, _ in string.Formatter().parse(template):
        pieces += [Special(p) if p in SPECIAL_TOKENS else p for p in _SPECIAL.split(literal) if p]
        if field is not None:
            pieces.append(fields[field])
    return pieces


def _join(sep: str, groups: list[list[str]]) -> list[str]:
    """`sep.join` over lists of pieces."""
    out: list[str] = []
    for i, group in enumerate(groups):
        out += ([sep] if i else []) + group
    return out


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as in the OpenAI API


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# -- encoding -----------------------------------------------------------------------------------
def _text(content: Any, param: str) -> str:
    """Message content as text: a string, None, or a list of OpenAI/Anthropic text blocks."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for i, block in enumerate(content):
            if not isinstance(block, dict) or block.get("type") != "text":
                kind = block.get("type") if isinstance(block, dict) else type(block).__name__
                raise ChatFormatError(f"{param}[{i}].type", f"only text content is supported, got {kind!r}")
            parts.append(str(block.get("text", "")))
        return "".join(parts)
    raise ChatFormatError(param, f"expected a string or a list of text blocks, got {type(content).__name__}")


def render_tool_calls(calls: list[dict[str, Any]], param: str = "tool_calls") -> list[str]:
    """OpenAI-style tool calls as a DSML block (without the leading blank line)."""
    invokes = []
    for i, call in enumerate(calls):
        fn = call.get("function", call)
        name, raw = fn.get("name"), fn.get("arguments", "{}")
        if not isinstance(name, str) or not name:
            raise ChatFormatError(f"{param}[{i}].function.name", "a tool call needs a name")
        if isinstance(raw, str):
            try:
                args = json.loads(raw) if raw.strip() else {}
            except json.JSONDecodeError:
                args = {"arguments": raw}  # as the official encoder: unparseable text becomes one parameter
        else:
            args = raw
        if not isinstance(args, dict):
            raise ChatFormatError(f"{param}[{i}].function.arguments", "must be a JSON object")
        params = [
            _fill(
                PARAMETER,
                name=str(k),
                is_str="true" if isinstance(v, str) else "false",
                value=v if isinstance(v, str) else _json(v),
            )
            for k, v in args.items()
        ]
        invokes.append(_fill(INVOKE_OPEN, name=name) + _join("\n", params) + _fill(f"\n{INVOKE_CLOSE}"))
    return _fill(f"{TOOLS_OPEN}\n") + _join("\n", invokes) + _fill(f"\n{TOOLS_CLOSE}")


def render_tools(tools: list[dict[str, Any]]) -> list[str]:
    schemas = []
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not fn.get("name"):
            raise ChatFormatError(f"tools[{i}].function.name", "each tool needs a function with a name")
        schemas.append(_json(fn))
    return _fill(TOOLS_TEMPLATE, schemas="\n".join(schemas))


def _merge_tool_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold `tool` messages (and the user text after them) into user turns of ordered blocks."""
    merged: list[dict[str, Any]] = []
    order: dict[str, int] = {}  # tool_call id -> position in the last assistant's calls
    for msg in messages:
        role, i = msg.get("role"), msg.get("_index", 0)
        if role == "assistant" and msg.get("tool_calls"):
            order = {c.get("id"): j for j, c in enumerate(msg["tool_calls"]) if c.get("id")}
        if role == "tool":
            # Unknown ids sort first, as in the official encoder (a stable sort with key 0).
            block = (
                "tool",
                order.get(msg.get("tool_call_id", ""), 0),
                _text(msg.get("content"), f"messages[{i}].content"),
            )
        elif role == "user":
            block = ("text", 0, _text(msg.get("content"), f"messages[{i}].content"))
        else:
            merged.append(msg)
            continue
        if merged and merged[-1].get("role") == "user" and "_blocks" in merged[-1]:
            merged[-1]["_blocks"].append(block)
        else:
            merged.append({"role": "user", "_blocks": [block], "_index": i})
    for msg in merged:
        if "_blocks" in msg:
            tools = sorted((b for b in msg["_blocks"] if b[0] == "tool"), key=lambda b: b[1])
            it = iter(tools)  # results take the call order; text blocks keep their places
            blocks = [next(it) if b[0] == "tool" else b for b in msg["_blocks"]]
            msg["content"] = "\n\n".join(
                f"<tool_result>{t}</tool_result>" if kind == "tool" else t for kind, _, t in blocks
            )
    return merged


def encode_messages(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    thinking: bool = False,
    reasoning_effort: str | None = None,
    response_format: dict[str, Any] | None = None,
    add_bos: bool = True,
) -> Prompt:
    """Render an OpenAI-style conversation as a V4 prompt, ending where the model continues.

    Roles: system, developer, user, assistant (content, reasoning_content, tool_calls; `prefix: true`
    on a final assistant message continues it instead of closing it), tool (tool_call_id, content).
    Tools and a response format attach to the first system message (one is added if missing).
    """
    if not messages:
        raise ChatFormatError("messages", "at least one message is required")
    if reasoning_effort is not None and reasoning_effort not in EFFORTS:
        raise ChatFormatError("reasoning_effort", f"expected one of {sorted(EFFORTS)}, got {reasoning_effort!r}")
    msgs = [copy.deepcopy(m) for m in messages]
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            role = m.get("role") if isinstance(m, dict) else m
            raise ChatFormatError(
                f"messages[{i}].role", f"expected system, developer, user, assistant or tool, got {role!r}"
            )
        m["_index"] = i
    if tools or response_format:
        if msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": ""})
        msgs[0]["tools"], msgs[0]["response_format"] = tools, response_format
    msgs = _merge_tool_results(msgs)
    keep_reasoning = any(m.get("tools") for m in msgs)
    last_user = max((i for i, m in enumerate(msgs) if m["role"] in ("user", "developer")), default=-1)
    if thinking and not keep_reasoning:
        # Earlier turns lose their reasoning; developer turns before the last user turn are dropped.
        msgs = [m for i, m in enumerate(msgs) if i >= last_user or m["role"] != "developer"]
        last_user = max((i for i, m in enumerate(msgs) if m["role"] in ("user", "developer")), default=-1)

    pieces: list[str] = [Special(BOS)] if add_bos else []
    if thinking and EFFORTS.get(reasoning_effort or "high"):
        pieces.append(REASONING_EFFORT_MAX)
    for i, m in enumerate(msgs):
        pieces += _render(m, i, thinking, keep_reasoning, last_user, i == len(msgs) - 1)
        nxt = msgs[i + 1]["role"] if i + 1 < len(msgs) else None
        if m["role"] in ("user", "developer") and nxt in (None, "assistant"):
            opens_thinking = thinking and (keep_reasoning or i >= last_user)
            pieces += [Special(ASSISTANT), Special(THINK if opens_thinking else END_THINK)]
    return Prompt(tuple(p for p in pieces if p))


def _render(m: dict[str, Any], i: int, thinking: bool, keep_reasoning: bool, last_user: int, last: bool) -> list[str]:
    role, param = m["role"], f"messages[{m.get('_index', i)}]"
    if role in ("system", "developer"):
        text = _text(m.get("content"), f"{param}.content")
        if role == "developer" and not text:
            raise ChatFormatError(f"{param}.content", "a developer message needs content")
        pieces = [Special(USER), text] if role == "developer" else [text]
        if m.get("tools"):
            pieces += ["\n\n", *render_tools(m["tools"])]
        if m.get("response_format"):
            pieces += ["\n\n", *_fill(RESPONSE_FORMAT_TEMPLATE, schema=_json(m["response_format"]))]
        return pieces
    if role == "user":
        return [Special(USER), m["content"]]
    # assistant
    out: list[str] = []
    if thinking and (keep_reasoning or i > last_user):
        reasoning = m.get("reasoning_content") or m.get("reasoning") or ""
        out += [_text(reasoning, f"{param}.reasoning_content"), Special(END_THINK)]
    out.append(_text(m.get("content"), f"{param}.content"))
    if m.get("tool_calls"):
        out += ["\n\n", *render_tool_calls(m["tool_calls"], f"{param}.tool_calls")]
    if not (last and m.get("prefix")):
        out.append(Special(EOS))
    return out


# -- parsing ------------------------------------------------------------------------------------
_INVOKE = re.compile(rf'<{DSML}invoke\s+name="([^"]*)"\s*>(.*?){re.escape(INVOKE_CLOSE)}', re.DOTALL)
_PARAM = re.compile(rf'<{DSML}parameter\s+name="([^"]*)"\s+string="(true|false)"\s*>(.*?)</{DSML}parameter>', re.DOTALL)


def _parse_invoke(name: str, body: str) -> ToolCall:
    args: dict[str, Any] = {}
    for key, is_str, value in _PARAM.findall(body):
        if is_str == "true":
            args[key] = value
        else:
            try:
                args[key] = json.loads(value)
            except json.JSONDecodeError:
                args[key] = value  # a malformed JSON value is kept as the text the model wrote
    return ToolCall(name, _json(args))


def _held(buf: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of buf that could be the start of one of the markers."""
    for n in range(min(len(buf), max(map(len, markers)) - 1), 0, -1):
        if any(m.startswith(buf[-n:]) for m in markers):
            return n
    return 0


class OutputParser:
    """Incremental parser of generated text: feed() deltas as they are detokenised, then finish().

    Returns events ("reasoning", str), ("content", str) and ("tool_call", ToolCall) in order. Text
    that might be the start of a marker (`</think>`, the tool-call block, EOS) is held back until it
    is decided. Output cut short (no `</think>`, an unclosed block) yields what was complete.
    """

    def __init__(self, thinking: bool):
        self.state = "reasoning" if thinking else "content"
        self.buf = ""

    def feed(self, text: str) -> list[tuple[str, Any]]:
        self.buf += text
        events: list[tuple[str, Any]] = []
        while self.state != "done" and self._step(events):
            pass
        return events

    def finish(self) -> list[tuple[str, Any]]:
        events: list[tuple[str, Any]] = []
        if self.state in ("reasoning", "content") and self.buf:
            events.append((self.state, self.buf))
        self.buf, self.state = "", "done"
        return events

    def _step(self, events: list[tuple[str, Any]]) -> bool:
        """Consume what can be decided now; True if the state changed (so try again)."""
        if self.state == "tools":
            m = _INVOKE.search(self.buf)
            close = self.buf.find(TOOLS_CLOSE)
            if m and (close < 0 or m.start() < close):
                events.append(("tool_call", _parse_invoke(m.group(1), m.group(2))))
                self.buf = self.buf[m.end() :]
                return True
            if close >= 0:
                self.buf, self.state = "", "done"  # what follows the block (EOS) is not content
            return False
        kind = self.state
        markers = (END_THINK, EOS) if kind == "reasoning" else (TOOLS_OPEN, EOS)
        hits = [(p, mk) for mk in markers if (p := self.buf.find(mk)) >= 0]
        if hits:
            pos, marker = min(hits)
            text = self.buf[:pos]
            if marker == TOOLS_OPEN:
                text = text.rstrip("\n")  # the blank line before the block belongs to the block
            if text:
                events.append((kind, text))
            self.buf = self.buf[pos + len(marker) :]
            self.state = {END_THINK: "content", TOOLS_OPEN: "tools", EOS: "done"}[marker]
            return True
        head = self.buf[: len(self.buf) - _held(self.buf, markers)]
        if kind == "content":  # blank lines may precede the tool-call block: hold them too
            head = head.rstrip("\n")
        if head:
            events.append((kind, head))
            self.buf = self.buf[len(head) :]
        return False


class PlainParser:
    """Raw completions: every generated character is content (OutputParser's feed/finish)."""

    def feed(self, text: str) -> list[tuple[str, Any]]:
        return [("content", text)] if text else []

    def finish(self) -> list[tuple[str, Any]]:
        return []


Parser = OutputParser | PlainParser  # what turns generated text into ("reasoning" | "content" | "tool_call", value)


@dataclass
class ParsedOutput:
    reasoning_content: str | None  # None in chat (non-thinking) mode
    content: str
    tool_calls: list[ToolCall]


def parse_output(text: str, thinking: bool) -> ParsedOutput:
    """Split a whole generated text (after the prompt's `<think>` / `</think>`) into its parts."""
    parser = OutputParser(thinking)
    parts: dict[str, list[Any]] = {"reasoning": [], "content": [], "tool_call": []}
    for kind, value in parser.feed(text) + parser.finish():
        parts[kind].append(value)
    return ParsedOutput(
        reasoning_content="".join(parts["reasoning"]) if thinking else None,
        content="".join(parts["content"]),
        tool_calls=parts["tool_call"],
    )
