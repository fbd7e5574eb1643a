"""A stand-in engine that replays fixed model outputs, for what random weights never emit.

A random-weight model never writes a DSML tool-call block, so the output direction of tool calls
(model text -> SDK `tool_calls` / `tool_use`) is driven by this deployment, which follows the engine
contract (`generate` streams {token_ids, finish_reason, num_prompt_tokens, num_output_tokens}) and
replays the tokenizer's encoding of a script chosen by the request's `seed` (special-token strings
in a script are special tokens). Everything between
the engine handle and the SDK (ingress, detokenizer, chat parser, SSE) is the real code.
"""

from __future__ import annotations

import asyncio

from ray import serve

from v4d.serving.chat import EOS
from v4d.serving.errors import ShardUnavailable
from v4d.serving.tokenizer import Tokenizer

DSML = "｜DSML｜"
TOOL_SCRIPT = (
    "The user wants the weather.</think>Let me check."
    f'\n\n<{DSML}tool_calls>\n<{DSML}invoke name="get_weather">\n'
    f'<{DSML}parameter name="city" string="true">Paris</{DSML}parameter>\n'
    f'<{DSML}parameter name="days" string="false">3</{DSML}parameter>\n</{DSML}invoke>\n'
    f"</{DSML}tool_calls>{EOS}"
)
# Stray special tokens in an answer: clients see "Hi there!" unless skip_special_tokens is false.
STRAY_SPECIALS_SCRIPT = f"Hi</think> there<｜User｜>!<think>{EOS}"
SCRIPTS = {1: TOOL_SCRIPT, 2: "partial answer that never ends " * 4, 3: STRAY_SPECIALS_SCRIPT}
FAIL_AFTER = {2: 3}  # seed -> tokens streamed before the stream fails like a lost shard


@serve.deployment(name="scripted-engine", ray_actor_options={"num_cpus": 0})
class ScriptedEngine:
    def __init__(self, checkpoint: str):
        tok = Tokenizer.from_file(checkpoint)
        self.eos = tok.eos_id
        self.scripts = {seed: tok.encode(text, special_tokens=True) for seed, text in SCRIPTS.items()}

    async def generate(self, request: dict):
        ids = self.scripts[request["seed"]]
        n_prompt = len(request["prompt_token_ids"])
        for i, t in enumerate(ids[: request["max_tokens"]], start=1):
            if FAIL_AFTER.get(request["seed"]) == i:
                raise ShardUnavailable("expert shard experts-x-0 died")
            await asyncio.sleep(0.005)
            stop = t == self.eos
            yield {
                "token_ids": [] if stop else [t],
                "finish_reason": "stop" if stop else ("length" if i == request["max_tokens"] else None),
                "num_prompt_tokens": n_prompt,
                "num_output_tokens": i,
            }
            if stop:
                return
