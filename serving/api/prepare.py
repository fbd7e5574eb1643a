"""Request body -> engine request, for each endpoint: validate, render the chat prompt, tokenize, size.

Everything a request needs before it meets an engine, as plain synchronous code: the ingress runs
it in a thread pool so its event loop never waits on a large prompt. Every failure is an `APIError`
naming the field the client sent; nothing half-valid comes out.
"""

from __future__ import annotations

import uuid

from v4d.serving.api import anthropic_api, chat_bridge, openai_api
from v4d.serving.api.chat_bridge import ChatPrompt
from v4d.serving.api.errors import APIError
from v4d.serving.api.generation import GenRequest
from v4d.serving.api.validation import parse_body, preview
from v4d.serving.chat import Prompt
from v4d.serving.engine.sequence import SamplingParams
from v4d.serving.tokenizer import Tokenizer


def longest_token_chars(tok: Tokenizer) -> int | None:
    """Most characters one token can cover, so a text of n characters has at least n / this many
    tokens; None when a normalizer may shrink text before tokenization (then there is no such bound)."""
    if tok.raw.normalizer is not None:
        return None
    return max(len(t) for t in tok.raw.get_vocab(with_added_tokens=True))


API_TEMPERATURE = 1.0  # an HTTP request's temperature when it names none


class Preparer:
    def __init__(self, served_name: str, max_context_tokens: int, tok: Tokenizer):
        self.model, self.limit, self.tok = served_name, max_context_tokens, tok
        longest = longest_token_chars(tok)
        self.max_prompt_chars = max_context_tokens * longest if longest else None

    # -- endpoints ---------------------------------------------------------------------------------
    def chat(self, raw: bytes) -> tuple[openai_api.ChatRequest, ChatPrompt, GenRequest]:
        req = parse_body(raw, openai_api.ChatRequest).validated()
        self._check_model(req.model)
        prompt = req.prompt()
        ids = self._encode(chat_bridge.render_prompt(prompt), "messages")
        params = self._params(
            len(ids),
            req.max_new_tokens(),
            req.temperature,
            req.top_p,
            req.seed,
            req.ignore_eos,
            max_tokens_param=req.max_tokens_param(),
        )
        return req, prompt, self._request("chatcmpl-", ids, params, req.stops())

    def completion(self, raw: bytes) -> tuple[openai_api.CompletionRequest, GenRequest]:
        req = parse_body(raw, openai_api.CompletionRequest).validated()
        self._check_model(req.model)
        prompt = req.text_or_ids()
        ids = self._encode(prompt, "prompt") if isinstance(prompt, str) else list(prompt)
        bad = [i for i in ids if not 0 <= i < self.tok.vocab_size]
        if bad:
            raise APIError(
                400, f"prompt: token ids out of range [0, {self.tok.vocab_size}): {preview(bad[:5])}", param="prompt"
            )
        params = self._params(
            len(ids),
            req.max_tokens or 16,
            req.temperature,
            req.top_p,
            req.seed,
            req.ignore_eos,
            prompt_param="prompt",
        )
        return req, self._request("cmpl-", ids, params, req.stops())

    def messages(self, raw: bytes) -> tuple[anthropic_api.MessagesRequest, ChatPrompt, GenRequest]:
        req = parse_body(raw, anthropic_api.MessagesRequest).validated()
        self._check_model(req.model)
        prompt = req.prompt()
        ids = self._encode(chat_bridge.render_prompt(prompt), "messages")
        params = self._params(len(ids), req.max_tokens, req.temperature, req.top_p, req.seed)
        return req, prompt, self._request("msg_", ids, params, req.stop_sequences or [])

    def count_tokens(self, raw: bytes) -> int:
        """Exact, whatever the length (no context check): Anthropic's count_tokens."""
        req = parse_body(raw, anthropic_api.CountTokensRequest).validated()
        self._check_model(req.model)
        return len(self.tok.encode_prompt(chat_bridge.render_prompt(req.prompt())))

    # -- pieces --------------------------------------------------------------------------------------
    def _check_model(self, model: str) -> None:
        if model != self.model:
            raise APIError(
                404,
                f"The model '{preview(model)}' does not exist; this server serves '{self.model}'.",
                param="model",
                code="model_not_found",
            )

    def _encode(self, prompt: Prompt | str, param: str) -> list[int]:
        """Token ids of a chat prompt (markers special, client text plain) or of a raw completions
        prompt (special-token strings parsed: its author writes it whole); one that certainly exceeds
        the context is refused before tokenizing."""
        text = prompt.text if isinstance(prompt, Prompt) else prompt
        if self.max_prompt_chars is not None and len(text) > self.max_prompt_chars:
            raise APIError(
                400,
                f"This model's maximum context length is {self.limit} tokens; the prompt ({len(text)} characters) "
                "has more.",
                param=param,
                code="context_length_exceeded",
            )
        ids = (
            self.tok.encode_prompt(prompt) if isinstance(prompt, Prompt) else self.tok.encode(text, special_tokens=True)
        )
        if not ids:
            raise APIError(400, f"{param}: the prompt has no tokens", param=param)
        return ids

    def _params(
        self,
        n_prompt: int,
        max_tokens: int | None,
        temperature: float | None,
        top_p: float | None,
        seed: int | None,
        ignore_eos: bool = False,
        prompt_param: str = "messages",
        max_tokens_param: str = "max_tokens",
    ) -> SamplingParams:
        limit = self.limit
        if n_prompt >= limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens; the prompt has {n_prompt}.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        max_tokens = max_tokens or limit - n_prompt
        if n_prompt + max_tokens > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens; the prompt ({n_prompt}) plus "
                f"{max_tokens_param} ({preview(str(max_tokens))}) is more.",
                param=max_tokens_param,
                code="context_length_exceeded",
            )
        return SamplingParams(
            max_tokens=max_tokens,
            # Omitted: 1.0, OpenAI's and Anthropic's default (the engine's own default is greedy, 0).
            temperature=API_TEMPERATURE if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            seed=seed,
            stop_token_ids=() if ignore_eos else (self.tok.eos_id,),  # ignore_eos: max_tokens whatever comes
            ignore_eos=ignore_eos,
        )

    def _request(self, prefix: str, ids: list[int], params: SamplingParams, stop: list[str]) -> GenRequest:
        return GenRequest(f"{prefix}{uuid.uuid4().hex}", ids, params, stop)
