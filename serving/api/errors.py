"""HTTP errors in each API's own JSON shape, and the mapping from engine exceptions to them.

OpenAI:    {"error": {"message", "type", "param", "code"}}
Anthropic: {"type": "error", "error": {"type", "message"}}
"""

from __future__ import annotations

from dataclasses import dataclass

from v4d.serving import errors as engine_errors

# status -> (OpenAI error type, Anthropic error type)
_TYPES: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("authentication_error", "authentication_error"),
    404: ("not_found_error", "not_found_error"),
    405: ("invalid_request_error", "invalid_request_error"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_error"),
    500: ("server_error", "api_error"),
    503: ("service_unavailable_error", "api_error"),
    504: ("timeout_error", "api_error"),
}


@dataclass
class APIError(Exception):
    """An error answered to the client; `param` is the request field it is about (dotted path)."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    retry_after_s: float | None = None

    def __str__(self) -> str:
        return self.message

    def openai_body(self) -> dict:
        kind = _TYPES.get(self.status, _TYPES[500])[0]
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict:
        kind = _TYPES.get(self.status, _TYPES[500])[1]
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after_s)))}


def bad_request(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _root_cause(exc: BaseException) -> BaseException:
    """Ray wraps replica exceptions (RayTaskError); the original one is in `.cause`."""
    seen = 0
    while getattr(exc, "cause", None) is not None and seen < 5:
        exc = exc.cause  # type: ignore[assignment]
        seen += 1
    return exc


def engine_counted(exc: BaseException) -> bool:
    """Whether the engine already counted this failure in its metrics (it refused the request itself)."""
    return any(isinstance(e, (engine_errors.Overloaded, engine_errors.ContextTooLong)) for e in (exc, _root_cause(exc)))


def error_kind(err: APIError) -> str:
    """The `kind` label of v4d:request_errors_total for an answered error."""
    if err.code == "context_length_exceeded":
        return "context_too_long"
    if err.status == 503:
        return "shard_unavailable" if err.code == "shard_unavailable" else "unavailable"
    return {401: "unauthorized", 404: "not_found", 504: "timeout"}.get(
        err.status, "bad_request" if err.status < 500 else "internal"
    )


def from_exception(exc: BaseException, prompt_param: str = "messages") -> APIError:
    """Map an exception raised by the engine (possibly through a Ray handle) to an APIError;
    `prompt_param` is the request field holding the prompt (context errors name it)."""
    if isinstance(exc, APIError):
        return exc
    cause = _root_cause(exc)
    for e in (cause, exc):  # the original exception first: its str() is the message, not a traceback
        if isinstance(e, engine_errors.Overloaded):
            return APIError(429, f"The server is overloaded: {e}", code="overloaded", retry_after_s=e.retry_after_s)
        if isinstance(e, engine_errors.ContextTooLong):
            return APIError(
                400,
                f"This model's maximum context length is {e.limit} tokens; the request needs {e.got}.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if isinstance(e, engine_errors.BadRequest):
            return APIError(400, str(e.message), param=e.param)
        if isinstance(e, engine_errors.ShardUnavailable):
            return APIError(503, f"An expert shard is unavailable: {e}", code="shard_unavailable")
    if isinstance(cause, TimeoutError):
        return APIError(504, "No answer from the engine in time; retry the request.", code="timeout")
    name = type(cause).__name__
    if name in ("ActorDiedError", "RayActorError", "ActorUnavailableError", "DeploymentUnavailableError"):
        return APIError(503, f"A serving replica is unavailable ({name}); retry the request.", code="unavailable")
    return APIError(500, f"Internal error: {name}: {cause}", code="internal_error")
