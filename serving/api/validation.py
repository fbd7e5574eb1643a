"""The one validation layer of both APIs: a request body becomes a pydantic model or a 400 naming the field.

Bodies are hostile until parsed: JSON must be an object of finite numbers nested at most
`MAX_JSON_DEPTH` deep, without lone UTF-16 surrogates in any string (they cannot be encoded,
so nothing downstream could use them); the body-size limit (413) is enforced while the ingress reads
it. Error messages quote at most `PREVIEW_CHARS` of what the client sent.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from v4d.serving.api.errors import APIError, bad_request

M = TypeVar("M", bound=BaseModel)

MAX_JSON_DEPTH = 64  # objects/arrays inside each other; tool schemas need a handful
PREVIEW_CHARS = 64
MAX_STOP = 16  # stop sequences per request (OpenAI `stop`, Anthropic `stop_sequences`)
MAX_STOP_CHARS = 256  # characters per stop sequence (the matcher holds back up to this much text)
MAX_TOOLS = 128
_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins valid pairs, so any left is lone


class Strict(BaseModel):
    """Request models: strict types ("5" is not an int), unknown fields ignored like the real APIs."""

    model_config = ConfigDict(extra="ignore", strict=True)


def preview(value: Any) -> str:
    """A short, always-encodable quote of client input for error messages."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    short = text[:PREVIEW_CHARS].encode("utf-8", "backslashreplace").decode("utf-8")
    return short + "..." if len(text) > PREVIEW_CHARS else short


def _is_type_tag(part: object) -> bool:
    # pydantic adds union-member tags such as 'str' or 'list[TextPart]' to error locations
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool", "list", "dict", "none") or any(c in part for c in "[-")
    )


def field_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not _is_type_tag(p))


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number out of range: {preview(text)}")
    return value


def _path(link: tuple | None) -> str:
    parts: list[str] = []
    while link is not None:
        link, key = link
        parts.append(str(key))
    return ".".join(reversed(parts)) or None  # type: ignore[return-value]


def _check_tree(data: Any) -> None:
    """Depth and lone-surrogate checks over the parsed body, iteratively (no recursion to exhaust)."""
    stack: list[tuple[Any, tuple | None, int]] = [(data, None, 1)]
    while stack:
        node, link, depth = stack.pop()
        if isinstance(node, str):
            if not node.isascii() and _SURROGATE.search(node):
                path = _path(link)
                raise bad_request(path, f"{path or 'body'}: contains a lone UTF-16 surrogate (not valid Unicode text)")
            continue
        if not isinstance(node, dict | list):
            continue
        if depth > MAX_JSON_DEPTH:
            field = (_path(link) or "").split(".")[0]  # the top-level field the client sent
            raise bad_request(field, f"{field}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(key, str) and not key.isascii() and _SURROGATE.search(key):
                path = _path(link)
                raise bad_request(path, f"{path or 'body'}: a key contains a lone UTF-16 surrogate")
            if isinstance(value, str | dict | list):
                stack.append((value, (link, key), depth + 1))


def read_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400: invalid JSON, NaN/Infinity, too deep, lone surrogates."""
    try:
        data = json.loads(raw or b"null", parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise bad_request(None, f"Request body is JSON nested deeper than {MAX_JSON_DEPTH} levels.") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(None, f"Request body is not valid JSON: {preview(str(e))}") from None
    if not isinstance(data, dict):
        raise bad_request(None, "Request body must be a JSON object.")
    _check_tree(data)
    return data


def parse_body(raw: bytes, model: type[M]) -> M:
    data = read_json(raw)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        # For a union, the deepest error is the branch that matched furthest (usually the intended one).
        err = max(e.errors(include_url=False), key=lambda x: len(field_path(x["loc"])))
        path = field_path(err["loc"])
        if err["type"] == "missing":
            raise bad_request(path, f"{path}: field required") from None
        got = err.get("input")
        got = f'"{preview(got)}"' if isinstance(got, str) else preview(got)
        raise bad_request(path, f"{path}: {err['msg']} (got {got})") from None


def check(condition: bool, param: str, message: str) -> None:
    if not condition:
        raise APIError(400, f"{param}: {message}", param=param)


def check_stops(stops: list[str], param: str) -> list[str]:
    check(len(stops) <= MAX_STOP, param, f"at most {MAX_STOP} stop sequences are supported, got {len(stops)}")
    for i, s in enumerate(stops):
        check(len(s) <= MAX_STOP_CHARS, f"{param}.{i}", f"at most {MAX_STOP_CHARS} characters, got {len(s)}")
    return stops
