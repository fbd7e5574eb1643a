"""One request inside the engine: its tokens, sampling parameters, cache handle and timings."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from v4d.serving.errors import BadRequest

# What torch.Generator.manual_seed takes: [-2**63, 2**64 - 1] (negatives are mapped to 2**64 + seed);
# outside it raises, so the engine refuses such seeds before a request is queued.
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """The one set of sampling parameters (engine requests and both HTTP APIs). An engine request that
    names no temperature is greedy (0); the HTTP APIs fill in their own default, 1.0 (api/prepare.py)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @classmethod
    def from_request(cls, req: dict[str, Any]) -> SamplingParams:
        """Validate the sampling fields of an engine request (docs/contracts.md); BadRequest names the field."""

        def num(name: str, default: float | None, kind: type) -> Any:
            v = req.get(name)
            if v is None:
                return default
            if isinstance(v, bool) or not isinstance(v, int | float) or (kind is int and not isinstance(v, int)):
                raise BadRequest(name, f"expected {'an integer' if kind is int else 'a number'}, got {v!r}")
            return kind(v)

        p = cls(
            max_tokens=num("max_tokens", cls.max_tokens, int),
            temperature=num("temperature", cls.temperature, float),
            top_p=num("top_p", cls.top_p, float),
            seed=num("seed", cls.seed, int),
            stop_token_ids=tuple(_ids(req.get("stop_token_ids") or [], "stop_token_ids")),
            ignore_eos=bool(req.get("ignore_eos", False)),
        )
        if p.max_tokens < 1:
            raise BadRequest("max_tokens", f"must be at least 1, got {p.max_tokens}")
        if p.temperature < 0:
            raise BadRequest("temperature", f"must be >= 0, got {p.temperature}")
        if not 0 < p.top_p <= 1:
            raise BadRequest("top_p", f"must be in (0, 1], got {p.top_p}")
        if p.seed is not None and not SEED_MIN <= p.seed <= SEED_MAX:
            raise BadRequest("seed", f"must be in [-2**63, 2**64 - 1], got {str(p.seed)[:40]}")
        return p


def _ids(v: Any, name: str) -> list[int]:
    if not isinstance(v, list | tuple) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise BadRequest(name, "expected a list of integer token ids")
    if any(t < 0 for t in v):
        raise BadRequest(name, "token ids must be >= 0")
    return list(v)


def prompt_ids(req: dict[str, Any], vocab_size: int) -> list[int]:
    ids = _ids(req.get("prompt_token_ids"), "prompt_token_ids")
    if not ids:
        raise BadRequest("prompt_token_ids", "must not be empty")
    if max(ids) >= vocab_size:
        raise BadRequest("prompt_token_ids", f"token id {max(ids)} is outside the vocabulary (size {vocab_size})")
    return ids


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Token ids are prompt + output; `num_computed` of them are in the KV cache.

    Prefill and decode are one thing: the next forward computes `token_ids[num_computed:]` (or a
    chunk of it); when it reaches the end, its last logits sample the next token. A preempted
    sequence recomputes prompt + output the same way.
    """

    request_id: str
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0
    slot: int = -1
    pages: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    num_cached: int = 0  # prompt tokens served from the prefix cache
    shard_failures: int = 0  # steps that failed because experts were unreachable

    @property
    def token_ids(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def num_remaining(self) -> int:
        """Tokens still to compute before the next sample (1 while decoding)."""
        return self.num_tokens - self.num_computed

    @property
    def max_total_tokens(self) -> int:
        return len(self.prompt) + self.params.max_tokens
