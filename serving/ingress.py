"""The Serve ingress: OpenAI- and Anthropic-compatible HTTP in front of the attention engines.

Per request: authenticate, read the body (at most `serving.max_request_bytes`, else 413), then in a
bounded thread pool (so the event loop, /healthz included, never waits on a big prompt) validate it
(400s name the field; `api.validation`), render the chat prompt, tokenize and check the context
limit; then stream from an engine replica through its handle. The first engine item is
awaited before answering so queue-full (429 + Retry-After), context and shard errors get a real
HTTP status; after that, errors end the stream with an error event in the API's own shape. A
client that goes away cancels the engine request (the handle's response is cancelled).
"""

import asyncio
import hmac
import json
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from v4d.serving import chat
from v4d.serving.api import anthropic_api, chat_bridge, openai_api
from v4d.serving.api.errors import APIError, engine_counted, error_kind, from_exception
from v4d.serving.api.generation import Event, EventParser, Finished, GenRequest, events
from v4d.serving.api.prepare import Preparer
from v4d.serving.api.validation import preview
from v4d.serving.metrics import ServingMetrics, plan_labels
from v4d.serving.plan import Plan
from v4d.serving.tokenizer import Tokenizer

app = FastAPI(title="v4d", docs_url=None, redoc_url=None, openapi_url=None)

Flavor = str  # "openai" | "anthropic"
T = TypeVar("T")
PREPARE_THREADS = 4  # validation + chat rendering + tokenization; more requests wait for a thread
_ANTHROPIC_PATH = re.compile(r"/v1/messages(/|$)")


def _flavor(request: Request) -> Flavor:
    """Whose error shape a request gets: Anthropic's under /v1/messages or from its SDK, else OpenAI's."""
    anthropic = _ANTHROPIC_PATH.search(request.url.path) or "anthropic-version" in request.headers
    return "anthropic" if anthropic else "openai"


def _error_response(err: APIError, flavor: Flavor, headers: dict[str, str] | None = None) -> Response:
    body = err.anthropic_body() if flavor == "anthropic" else err.openai_body()
    # ASCII-escaped JSON: whatever a message quotes, the reply always encodes
    return Response(
        json.dumps(body),
        status_code=err.status,
        media_type="application/json",
        headers={**(headers or {}), **err.headers()},
    )


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """Unknown routes and methods answer in the API's shape too (not FastAPI's {"detail": ...})."""
    err = APIError(exc.status_code, f"{preview(request.method)} {preview(request.url.path)}: {exc.detail}")
    metrics = getattr(request.app.state, "metrics", None)  # set by the Ingress replica of this process
    if metrics is not None:
        metrics.request_errors.inc(tags={"kind": error_kind(err)})
    return _error_response(err, _flavor(request), exc.headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    too_large = APIError(
        413, f"Request body is larger than {limit} bytes (spec.serving.maxRequestBytes).", code="request_too_large"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(
            400, "The client disconnected before sending the whole body.", code="client_disconnected"
        ) from None
    return b"".join(chunks)


@serve.deployment(
    name="ingress",
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=1000,
    graceful_shutdown_timeout_s=30,
)
@serve.ingress(app)
class Ingress:
    def __init__(self, engine: DeploymentHandle, plan: Plan, checkpoint: str, api_key: str | None = None):
        self.plan = plan
        self.model = self.plan.served_name
        self.created = int(time.time())
        self.engine = engine.options(stream=True)
        self.tok = Tokenizer.from_file(checkpoint)
        self.prepare = Preparer(self.plan.served_name, self.plan.max_context_tokens, self.tok)
        self.max_request_bytes = self.plan.serving.max_request_bytes
        self.pool = ThreadPoolExecutor(max_workers=PREPARE_THREADS, thread_name_prefix="v4d-prepare")
        self.api_key = api_key or os.environ.get(self.plan.serving.api_key_env) or None
        self.timeout_s = self.plan.serving.request_timeout_s
        self.inflight = 0  # requests holding an engine stream
        self.draining = False
        self.metrics = ServingMetrics(role="ingress", **plan_labels(plan, ""))  # the head node: no pool
        self.metrics.ready()
        app.state.metrics = self.metrics  # for the router's own errors (unknown route, wrong method)

    # -- plumbing --------------------------------------------------------------------------
    async def _answer(
        self,
        request: Request,
        flavor: Flavor,
        handler: Callable[[], Awaitable[Response]],
        prompt_param: str = "messages",
    ) -> Response:
        try:
            self._authorize(request)
            return await handler()
        except Exception as e:  # every failure leaves in the API's own error shape
            return _error_response(self._failed(e, prompt_param), flavor)

    async def _prepared(self, request: Request, prepare: Callable[[bytes], T]) -> T:
        """Read the body (size-bounded), then run `prepare` on it in the thread pool, off the event loop."""
        raw = await read_body(request, self.max_request_bytes)
        return await asyncio.get_running_loop().run_in_executor(self.pool, prepare, raw)

    def _failed(self, e: Exception, prompt_param: str = "messages") -> APIError:
        """The client's error for `e`, counted unless the engine counted it when it refused the request."""
        err = from_exception(e, prompt_param)
        if not engine_counted(e):
            self.metrics.request_errors.inc(tags={"kind": error_kind(err)})
        return err

    def _authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        auth = request.headers.get("authorization", "")
        key = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(key.encode(), self.api_key.encode()):
            raise APIError(401, "Invalid or missing API key.", code="invalid_api_key")

    async def _start(self, gen: GenRequest, parser: EventParser) -> AsyncIterator[Event]:
        """Submit to an engine and wait for its first item; return the request's event stream."""
        if self.draining:
            raise APIError(503, "The server is shutting down; retry on another instance.", code="shutting_down")
        stream = self.engine.generate.remote(gen.engine_request())
        self.inflight += 1
        try:
            first = await asyncio.wait_for(anext(stream, None), self.timeout_s)
        except BaseException:
            self.inflight -= 1
            stream.cancel()
            raise
        return self._events(stream, first, gen, parser)

    async def _events(
        self, stream: Any, first: dict | None, gen: GenRequest, parser: EventParser
    ) -> AsyncIterator[Event]:
        done = False

        async def items() -> AsyncIterator[dict]:
            nonlocal done
            item = first
            while item is not None:
                done = done or bool(item.get("finish_reason"))
                yield item
                item = await asyncio.wait_for(anext(stream, None), self.timeout_s)
            done = True

        try:
            async for ev in events(items(), chat_bridge.decoder(self.tok), parser, gen.stop, len(gen.prompt_token_ids)):
                if isinstance(ev, Finished) and ev.reason == "abort":
                    raise APIError(503, "The request was aborted by the server; retry it.", code="aborted")
                yield ev
        except TimeoutError:
            raise APIError(504, f"No progress from the engine in {self.timeout_s:g} s.", code="timeout") from None
        finally:
            self.inflight -= 1
            if not done:  # stop sequence, client gone, or error: free the engine's slot now
                stream.cancel()

    async def _sse(self, chunks: AsyncIterator[str], on_error: Callable[[APIError], str]) -> AsyncIterator[str]:
        try:
            async for c in chunks:
                yield c
        except Exception as e:
            yield on_error(self._failed(e))

    async def drain(self) -> int:
        """Refuse new requests (503) from now on; return how many are still in flight.

        Called (through the app handle) before shutting down, until it returns 0, so in-flight
        streams finish while every deployment they need is still up."""
        self.draining = True
        return self.inflight

    # -- routes -----------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model}

    @app.get("/v4d/autoscaling")
    async def autoscaling(self) -> dict[str, Any]:
        from v4d.serving.decision_publish import read_decisions

        return {"decisions": read_decisions(serve.get_replica_context().app_name)}

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        async def run() -> Response:
            return JSONResponse(openai_api.models_list(self.model, self.created))

        return await self._answer(request, "openai", run)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        async def run() -> Response:
            req, prompt, gen = await self._prepared(request, self.prepare.chat)
            parser = chat.OutputParser(prompt.thinking)
            evs = await self._start(gen, chat_bridge.output_parser(parser, self.tok, req.skip_special_tokens))
            if req.stream:
                usage = bool(req.stream_options and req.stream_options.include_usage)
                chunks = openai_api.chat_stream(gen.request_id, self.model, evs, usage)
                return StreamingResponse(self._sse(chunks, openai_api.stream_error), media_type="text/event-stream")
            return JSONResponse(openai_api.chat_completion(gen.request_id, self.model, [e async for e in evs]))

        return await self._answer(request, "openai", run)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        async def run() -> Response:
            req, gen = await self._prepared(request, self.prepare.completion)
            evs = await self._start(
                gen, chat_bridge.output_parser(chat.PlainParser(), self.tok, req.skip_special_tokens)
            )
            if req.stream:
                usage = bool(req.stream_options and req.stream_options.include_usage)
                chunks = openai_api.completion_stream(gen.request_id, self.model, evs, usage)
                return StreamingResponse(self._sse(chunks, openai_api.stream_error), media_type="text/event-stream")
            return JSONResponse(openai_api.completion(gen.request_id, self.model, [e async for e in evs]))

        return await self._answer(request, "openai", run, prompt_param="prompt")

    @app.post("/v1/messages")
    async def messages(self, request: Request) -> Response:
        async def run() -> Response:
            req, prompt, gen = await self._prepared(request, self.prepare.messages)
            parser = chat.OutputParser(prompt.thinking)
            evs = await self._start(gen, chat_bridge.output_parser(parser, self.tok, req.skip_special_tokens))
            if req.stream:
                chunks = anthropic_api.message_stream(gen.request_id, self.model, len(gen.prompt_token_ids), evs)
                return StreamingResponse(self._sse(chunks, anthropic_api.stream_error), media_type="text/event-stream")
            return JSONResponse(anthropic_api.message(gen.request_id, self.model, [e async for e in evs]))

        return await self._answer(request, "anthropic", run)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(self, request: Request) -> Response:
        async def run() -> Response:
            return JSONResponse({"input_tokens": await self._prepared(request, self.prepare.count_tokens)})

        return await self._answer(request, "anthropic", run)
