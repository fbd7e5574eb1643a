"""The Serve ingress: OpenAI- and Anthropic-compatible HTTP in front of the attention engines.

Per request: authenticate, validate (400s name the field), render the chat prompt, check the
context limit, then stream from an engine replica through its handle. The first engine item is
awaited before answering so queue-full (429 + Retry-After), context and shard errors get a real
HTTP status; after that, errors end the stream with an error event in the API's own shape. A
client that goes away cancels the engine request (the handle's response is cancelled).
"""


import asyncio
import hmac
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from v4d.serving.api import anthropic_api, chat_bridge, openai_api
from v4d.serving.api.errors import APIError, engine_counted, error_kind, from_exception
from v4d.serving.api.generation import Event, Finished, GenRequest, PlainParser, SamplingParams, events
from v4d.serving.api.validation import parse_body
from v4d.serving.metrics import ServingMetrics, plan_labels
from v4d.serving.plan import Plan
from v4d.serving.tokenizer import Tokenizer

app = FastAPI(title="v4d", docs_url=None, redoc_url=None, openapi_url=None)

Flavor = str  # "openai" | "anthropic"


def _error_response(err: APIError, flavor: Flavor) -> JSONResponse:
    body = err.anthropic_body() if flavor == "anthropic" else err.openai_body()
    return JSONResponse(body, status_code=err.status, headers=err.headers())


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and methods answer in the API's shape too (not FastAPI's {"detail": ...})."""
    flavor = "anthropic" if request.url.path.rstrip("/").endswith("/v1/messages") else "openai"
    err = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
    metrics = getattr(request.app.state, "metrics", None)  # set by the Ingress replica of this process
    if metrics is not None:
        metrics.request_errors.inc(tags={"kind": error_kind(err)})
    return _error_response(err, flavor)


@serve.deployment(
    name="ingress",
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=1000,
    graceful_shutdown_timeout_s=30,
)
@serve.ingress(app)
class Ingress:
    def __init__(self, engine: DeploymentHandle, plan: dict[str, Any], checkpoint: str, api_key: str | None = None):
        self.plan = Plan.from_dict(plan)
        self.model = self.plan.served_name
        self.created = int(time.time())
        self.engine = engine.options(stream=True)
        self.tok = Tokenizer.from_file(checkpoint)
        self.api_key = api_key or os.environ.get(self.plan.serving.api_key_env) or None
        self.timeout_s = self.plan.serving.request_timeout_s
        self.inflight = 0  # requests holding an engine stream
        self.draining = False
        self.metrics = ServingMetrics(role="ingress", **plan_labels(plan, ""))  # the head node: no pool
        self.metrics.ready()
        app.state.metrics = self.metrics  # for the router's own errors (unknown route, wrong method)

    # -- plumbing --------------------------------------------------------------------------
    async def _answer(self, request: Request, flavor: Flavor, handler: Callable[[], Awaitable[Response]]) -> Response:
        try:
            self._authorize(request)
            return await handler()
        except Exception as e:  # every failure leaves in the API's own error shape
            return _error_response(self._failed(e), flavor)

    def _failed(self, e: Exception) -> APIError:
        """The client's error for `e`, counted unless the engine counted it when it refused the request."""
        err = from_exception(e)
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

    def _check_model(self, model: str) -> None:
        if model != self.model:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model}'.", param="model", code="model_not_found")

    def _params(
        self,
        n_prompt: int,
        max_tokens: int | None,
        temperature: float | None,
        top_p: float | None,
        seed: int | None,
        stop: list[str],
        ignore_eos: bool = False,
    ) -> SamplingParams:
        limit = self.plan.max_context_tokens
        if n_prompt >= limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens; the prompt has {n_prompt}.",
                param="messages",
                code="context_length_exceeded",
            )
        max_tokens = max_tokens or limit - n_prompt
        if n_prompt + max_tokens > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens; the prompt ({n_prompt}) plus "
                f"max_tokens ({max_tokens}) is {n_prompt + max_tokens}.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            seed=seed,
            stop=stop,
            ignore_eos=ignore_eos,
        )

    async def _start(self, gen: GenRequest, parser: Any) -> AsyncIterator[Event]:
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

    async def _events(self, stream: Any, first: dict | None, gen: GenRequest, parser: Any) -> AsyncIterator[Event]:
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
            async for ev in events(items(), chat_bridge.decoder(self.tok), parser, gen.params.stop, len(gen.prompt_token_ids)):
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

    def _new_request(self, prefix: str, ids: list[int], params: SamplingParams) -> GenRequest:
        return GenRequest(f"{prefix}{uuid.uuid4().hex}", ids, params, stop_token_ids=[self.tok.eos_id])

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
            req = parse_body(await request.body(), openai_api.ChatRequest).validated()
            self._check_model(req.model)
            prompt = req.prompt()
            ids = chat_bridge.encode_prompt(self.tok, prompt)
            params = self._params(
                len(ids), req.max_new_tokens(), req.temperature, req.top_p, req.seed, req.stops(), req.ignore_eos
            )
            gen = self._new_request("chatcmpl-", ids, params)
            parser = chat_bridge.output_parser(chat_bridge.ChatOutputParser(prompt.thinking), self.tok, req.skip_special_tokens)
            evs = await self._start(gen, parser)
            if req.stream:
                usage = bool(req.stream_options and req.stream_options.include_usage)
                chunks = openai_api.chat_stream(gen.request_id, self.model, evs, usage)
                return StreamingResponse(self._sse(chunks, openai_api.stream_error), media_type="text/event-stream")
            return JSONResponse(openai_api.chat_completion(gen.request_id, self.model, [e async for e in evs]))

        return await self._answer(request, "openai", run)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        async def run() -> Response:
            req = parse_body(await request.body(), openai_api.CompletionRequest).validated()
            self._check_model(req.model)
            prompt = req.text_or_ids()
            ids = self.tok.encode(prompt, special_tokens=True) if isinstance(prompt, str) else list(prompt)
            bad = [i for i in ids if not 0 <= i < self.tok.vocab_size]
            if bad:
                raise APIError(400, f"prompt: token ids out of range [0, {self.tok.vocab_size}): {bad[:5]}", param="prompt")
            params = self._params(
                len(ids), req.max_tokens or 16, req.temperature, req.top_p, req.seed, req.stops(), req.ignore_eos
            )
            gen = self._new_request("cmpl-", ids, params)
            evs = await self._start(gen, chat_bridge.output_parser(PlainParser(), self.tok, req.skip_special_tokens))
            if req.stream:
                usage = bool(req.stream_options and req.stream_options.include_usage)
                chunks = openai_api.completion_stream(gen.request_id, self.model, evs, usage)
                return StreamingResponse(self._sse(chunks, openai_api.stream_error), media_type="text/event-stream")
            return JSONResponse(openai_api.completion(gen.request_id, self.model, [e async for e in evs]))

        return await self._answer(request, "openai", run)

    @app.post("/v1/messages")
    async def messages(self, request: Request) -> Response:
        async def run() -> Response:
            req = parse_body(await request.body(), anthropic_api.MessagesRequest).validated()
            self._check_model(req.model)
            prompt = req.prompt()
            ids = chat_bridge.encode_prompt(self.tok, prompt)
            params = self._params(len(ids), req.max_tokens, req.temperature, req.top_p, req.seed, req.stop_sequences or [])
            gen = self._new_request("msg_", ids, params)
            parser = chat_bridge.output_parser(chat_bridge.ChatOutputParser(prompt.thinking), self.tok, req.skip_special_tokens)
            evs = await self._start(gen, parser)
            if req.stream:
                chunks = anthropic_api.message_stream(gen.request_id, self.model, len(ids), evs)
                return StreamingResponse(self._sse(chunks, anthropic_api.stream_error), media_type="text/event-stream")
            return JSONResponse(anthropic_api.message(gen.request_id, self.model, [e async for e in evs]))

        return await self._answer(request, "anthropic", run)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(self, request: Request) -> Response:
        async def run() -> Response:
            req = parse_body(await request.body(), anthropic_api.CountTokensRequest).validated()
            self._check_model(req.model)
            return JSONResponse({"input_tokens": len(chat_bridge.encode_prompt(self.tok, req.prompt()))})

        return await self._answer(request, "anthropic", run)
