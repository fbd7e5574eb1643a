"""Parse a JSON body into a pydantic model, turning validation failures into 400s that name the field."""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from v4d.serving.api.errors import APIError, bad_request

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Request models: strict types ("5" is not an int), unknown fields ignored like the real APIs."""

    model_config = ConfigDict(extra="ignore", strict=True)


def _is_type_tag(part: object) -> bool:
    # pydantic adds union-member tags such as 'str' or 'list[TextPart]' to error locations
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool", "list", "dict", "none") or any(c in part for c in "[-")
    )


def field_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not _is_type_tag(p))


def parse_body(raw: bytes, model: type[M]) -> M:
    try:
        data = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(None, f"Request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad_request(None, "Request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        # For a union, the deepest error is the branch that matched furthest (usually the intended one).
        err = max(e.errors(include_url=False), key=lambda x: len(field_path(x["loc"])))
        path = field_path(err["loc"])
        if err["type"] == "missing":
            raise bad_request(path, f"{path}: field required") from None
        got = json.dumps(err.get("input"), default=str)[:80]
        raise bad_request(path, f"{path}: {err['msg']} (got {got})") from None


def check(condition: bool, param: str, message: str) -> None:
    if not condition:
        raise APIError(400, f"{param}: {message}", param=param)
