"""Errors that cross the engine <-> ingress boundary (Ray handles pickle them by value).

Each keeps its constructor arguments in `args` so pickling round-trips, and Ray's task-error wrapper
(`RayTaskError.as_instanceof_cause`) stays an instance of the original class. The ingress maps
them to HTTP: Overloaded -> 429 + Retry-After, ContextTooLong / BadRequest -> 400,
ShardUnavailable -> 503.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base of the errors the ingress maps to an HTTP status."""

    status_code = 500


class Overloaded(ServingError):
    """The engine's waiting queue is full; the client should retry after `retry_after_s`."""

    status_code = 429

    def __init__(self, retry_after_s: float, message: str = "engine overloaded: waiting queue is full"):
        super().__init__(retry_after_s, message)
        self.retry_after_s = retry_after_s
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} (retry after {self.retry_after_s:g}s)"


class ContextTooLong(ServingError):
    """Prompt plus max_tokens exceeds what the engine can ever hold (`limit` tokens)."""

    status_code = 400

    def __init__(self, limit: int, got: int):
        super().__init__(limit, got)
        self.limit = limit
        self.got = got

    def __str__(self) -> str:
        return (
            f"this request needs {self.got} tokens (prompt + max_tokens) but the context limit is {self.limit} tokens"
        )


class BadRequest(ServingError):
    """A request parameter is invalid; `param` names it."""

    status_code = 400

    def __init__(self, param: str, message: str):
        super().__init__(param, message)
        self.param = param
        self.message = message

    def __str__(self) -> str:
        return f"{self.param}: {self.message}"


class ShardUnavailable(ServingError):
    """No live copy of a needed expert answered (every shard holding it failed)."""

    status_code = 503

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message
