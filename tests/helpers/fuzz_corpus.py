"""A deterministic corpus of malformed requests over both APIs, as a hostile client would send them.

Each case is (method, path, body bytes, field): `field` is the top-level request field the case
broke (its 400 must name it), or None for body-level damage. Every body still asks for one token,
so a case that turns out valid (a hostile-looking value that is in range) costs one engine step.
"""

from __future__ import annotations

import json
import random
from typing import Any

MODEL = "v4-tiny"
USER = [{"role": "user", "content": "hello"}]
BASES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": MODEL, "messages": USER, "max_tokens": 1, "temperature": 0},
    "/v1/completions": {"model": MODEL, "prompt": "The sea", "max_tokens": 1, "temperature": 0},
    "/v1/messages": {"model": MODEL, "messages": USER, "max_tokens": 1, "temperature": 0},
    "/v1/messages/count_tokens": {"model": MODEL, "messages": USER},
}
ANTHROPIC = ("/v1/messages", "/v1/messages/count_tokens")
# fields each endpoint reads (beyond the base), to break one at a time
EXTRA_FIELDS = {
    "/v1/chat/completions": [
        "seed",
        "stop",
        "top_p",
        "n",
        "stream",
        "stream_options",
        "tools",
        "tool_choice",
        "thinking",
        "reasoning_effort",
        "logprobs",
        "response_format",
        "max_completion_tokens",
        "presence_penalty",
        "ignore_eos",
    ],
    "/v1/completions": ["seed", "stop", "top_p", "n", "stream", "echo", "logprobs", "suffix", "best_of", "ignore_eos"],
    "/v1/messages": [
        "seed",
        "stop_sequences",
        "top_p",
        "top_k",
        "stream",
        "system",
        "tools",
        "tool_choice",
        "thinking",
        "metadata",
    ],
    "/v1/messages/count_tokens": ["system", "tools", "tool_choice", "thinking"],
}
DEEP = "[" * 100_000 + "]" * 100_000  # RecursionError bait
NEAR_DEEP = "[" * 70 + "]" * 70  # over the depth limit, under Python's recursion limit


def hostile_values(rng: random.Random) -> list[Any]:
    """The values the issue found breaking things, then a random sample of other hostile ones."""
    always = [2**64, -(2**64), "\ud800", "x" * rng.randint(50_000, 120_000)]
    others = [
        None,
        True,
        -1,
        0,
        1.5,
        "",
        "5",
        [],
        {},
        [[[]]],
        [None],
        {"a": {}},
        10**30,
        -1e308,
        ["\udfff"],
        [{"type": "text"}],
        [{"type": "image"}],
        {"type": "enabled", "budget_tokens": -1},
        ["s"] * 1000,
        ["x" * 300],
    ]
    return always + rng.sample(others, 6)


def _dump(body: Any) -> bytes:
    # surrogatepass: the JSON text carries the lone surrogate as a \ud800 escape, as a hostile client sends it
    return json.dumps(body).encode("utf-8", "surrogatepass")


def corpus(seed: int = 15) -> list[tuple[str, str, bytes, str | None]]:
    rng = random.Random(seed)
    cases: list[tuple[str, str, bytes, str | None]] = []
    for path, base in BASES.items():
        raw_bodies = [
            b"",
            b"null",
            b"[]",
            b"123",
            b'"text"',
            b"{",
            b'{"model": ',
            b"\xff\xfe\xfd",
            b'{"a": NaN}',
            b'{"a": Infinity}',
            b'{"a": 1e400}',
            b'{"a": 1' + b"0" * 5000 + b"}",
            ('{"metadata": ' + DEEP + "}").encode(),
            ('{"metadata": ' + NEAR_DEEP + "}").encode(),
            _dump({**base, "\udc00": 1}),
        ]
        cases += [("POST", path, b, None) for b in raw_bodies]
        for field in [*base, *EXTRA_FIELDS[path]]:
            limits_output = field in ("max_tokens", "max_completion_tokens")
            if field in base and not (limits_output and path != "/v1/messages"):  # unlimited output: ~1000 tokens
                cases.append(("POST", path, _dump({k: v for k, v in base.items() if k != field}), field))
            for value in hostile_values(rng):
                if not (limits_output and value is None):
                    cases.append(("POST", path, _dump({**base, field: value}), field))
    # wrong methods and routes: each API's own error shape
    for path in BASES:
        cases += [("GET", path, b"", None), ("PUT", path, b"{}", None), ("DELETE", path, b"", None)]
    cases += [("POST", p, b"{}", None) for p in ("/v1/models", "/v1/nothing", "/v1/messages/nothing", "/v2/messages")]
    cases.append(("GET", "/v1/" + "a" * 4000, b"", None))
    return cases
