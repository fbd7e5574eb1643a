"""ModelRunner: packed batches, checked arguments, and two-micro-batch decode giving the same tokens
as one batch (with experts behind a transport, as on shards)."""

import asyncio

import pytest
import torch

from v4d.serving.config import TINY_FAST
from v4d.serving.engine.engine import Engine, EngineLimits
from v4d.serving.engine.transport import InProcessTransport, RemoteExperts, SlotMap
from v4d.serving.experts import ShardExperts
from v4d.serving.model.model import Transformer, init_weights
from v4d.serving.runtime.channels import current_tag
from v4d.serving.runtime.runner import ModelRunner
from v4d.serving.sizing import page_bytes, slot_bytes

from .reference import greedy

CFG = TINY_FAST
LAYERS = CFG.num_hidden_layers + CFG.num_nextn_predict_layers


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    m = init_weights(Transformer(CFG), seed=0).eval()
    tensors = {k: v for k, v in m.state_dict().items() if ".ffn.experts." in k}
    shards = [{"name": n, "slots": [list(r)] * LAYERS} for n, r in (("a", range(0, 8)), ("b", range(8, 16)))]
    cores = {s["name"]: ShardExperts(CFG, s["slots"], tensors) for s in shards}
    m.experts = RemoteExperts(SlotMap.from_shards(shards), TaggedTransport(cores))
    return m


class TaggedTransport(InProcessTransport):
    """In-process shards that record which micro-batch tag each call came on."""

    def __init__(self, shards):
        super().__init__(shards)
        self.tags = set()

    def dispatch(self, layer, calls):
        self.tags.add(current_tag())
        return super().dispatch(layer, calls)


def engine(model, micro_batches):
    seqs = 4
    limits = EngineLimits(
        (seqs + 1) * slot_bytes(CFG, "fp32") + 8 * page_bytes(CFG, "fp32"), seqs, 64, 8, 4096, kv_format="fp32"
    )  # exact: the greedy reference runs an fp32 cache
    return Engine(model, limits, runner=ModelRunner(model, micro_batches=micro_batches))


def test_two_micro_batches_give_the_same_tokens(model):
    prompts = [[(s + 7 * i) % CFG.vocab_size for i in range(n)] for s, n in ((3, 12), (50, 5), (90, 20), (7, 9))]
    want = [greedy(model, p, 6) for p in prompts]

    async def run(eng):
        async def one(p):
            return [
                t
                async for item in eng.generate({"prompt_token_ids": p, "max_tokens": 6, "ignore_eos": True})
                for t in item["token_ids"]
            ]

        return await asyncio.gather(*(one(p) for p in prompts))

    model.experts.transport.tags.clear()
    assert asyncio.run(run(engine(model, 2))) == want
    assert model.experts.transport.tags == {0, 1}  # the halves went out on their own tags


def test_pack_and_arguments(model):
    class Seq:
        token_ids, num_computed, slot, pages = [1, 2, 3, 4], 1, 0, [0]

    ((tokens, cache),) = ModelRunner.pack([(Seq(), 2)])
    assert tokens == [2, 3] and cache.num_tokens == 1 and cache.slot == 0
    with pytest.raises(ValueError, match="micro_batches: expected 1..2, got 3"):
        ModelRunner(model, micro_batches=3)
    with pytest.raises(ValueError, match="rank: expected 0..0, got 1"):
        ModelRunner(model, rank=1)


def test_micro_batches_from_the_manifest_reach_the_engines_runner(model):
    from dataclasses import replace

    from helpers.opspecs import load_example

    from v4d.operator.planner import plan
    from v4d.operator.validate import validate_spec

    spec = load_example("local-tiny.yaml")["spec"]
    assert plan(spec, name="tiny").engine.micro_batches == 1  # the default
    spec["serving"]["microBatches"] = 2
    limits = EngineLimits.from_plan(plan(spec, name="tiny").engine, 4096)
    assert limits.micro_batches == 2
    small = replace(
        limits,
        kv_budget_bytes=5 * slot_bytes(CFG, "fp32") + 8 * page_bytes(CFG, "fp32"),
        max_num_seqs=4,
        kv_format="fp32",
    )
    assert Engine(model, small).runner.micro_batches == 2
    spec["serving"]["microBatches"] = 3
    assert [i.path for i in validate_spec(spec)] == ["spec.serving.microBatches"]


def test_the_shared_expert_runs_while_the_routed_rows_are_away(model):
    """MoE sends the routed rows, computes the shared expert, then collects (DeepSeek's overlap of the
    shared expert with dispatch); the sum equals the in-process form (shared expert adding the routed
    output in its last launch) bit for bit."""
    events = []

    class Recording(InProcessTransport):
        def start(self, layer, calls):
            events.append("sent")
            out = self.dispatch(layer, calls)
            return lambda: events.append("back") or out

    remote = model.experts
    moe = model.layers[-1].ffn
    hook = moe.shared_experts.register_forward_hook(lambda *_: events.append("shared"))
    try:
        g = torch.Generator().manual_seed(5)
        x = torch.randn(6, CFG.hidden_size, generator=g)
        input_ids = torch.randint(0, CFG.vocab_size, (6,), generator=g)
        overlapped = moe(x, input_ids, RemoteExperts(remote.map, Recording(remote.transport.shards)))
        assert events == ["sent", "shared", "back"]
        fused = moe(x, input_ids, lambda *a: remote(*a))  # a backend without `start`: the fused add
    finally:
        hook.remove()
    assert torch.equal(overlapped, fused)
