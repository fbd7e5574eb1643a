"""The deployed precision (FP8 / MXFP4 weights kept, bf16 activations) against fp32 on v4-tiny, and
the bytes each precision holds against the size math the planner budgets with."""

from __future__ import annotations

import pytest
import torch

from v4d.serving import sizing
from v4d.serving.checkpoint import make_checkpoint
from v4d.serving.experts import ShardExperts
from v4d.serving.model.loader import load_model

STEPS = 64
# Measured on v4-tiny (seed 0, the prompt below, CPU references), KL(fp32 || other) in nats:
#   deployed (FP8 weights x FP8 activations per 128, MXFP4 experts, bf16 elsewhere):
#            top-1 agreement 49/64 = 0.77, KL mean 0.023, max 0.16
#   bf16     (weights decoded once, bf16 activations): agreement 63/64, KL mean 0.0008, max 0.025
# Both load the same checkpoint, so the weights are identical: the gap is the activations' FP8
# rounding. A random tiny model is nearly flat (median top probability 1.7%, median top-2 logit
# margin 0.24), so near-ties flip often; the bounds sit just outside the measurement.
MIN_AGREEMENT, MAX_MEAN_KL, MAX_KL = 0.70, 0.04, 0.3
BF16_MIN_AGREEMENT, BF16_MAX_MEAN_KL = 0.95, 0.004


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint("v4-tiny", tmp_path_factory.mktemp("tiny"), seed=0)


def resident_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (stacked experts' views count once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def greedy(model, prompt: list[int], steps: int, fmt: str | None = None) -> list[int]:
    kv, seq = model.scratch_cache(len(prompt) + steps, fmt=fmt)
    out, chunk = [], prompt
    for _ in range(steps):
        tok = int(model.forward([(chunk, seq)], kv)[0].argmax())
        out.append(tok)
        chunk = [tok]
    return out


def test_deployed_agrees_with_fp32_over_64_greedy_steps(ckpt):
    ref = load_model(ckpt, precision="fp32", progress=False)
    dep = load_model(ckpt, precision="deployed", progress=False)
    assert dep.layers[0].attn.wq_a.weight.dtype == torch.float8_e4m3fn
    assert dep.layers[0].ffn.experts[0].w1.weight.dtype == torch.int8
    prompt = [1, 17, 250, 33, 901, 5, 77, 300]
    tokens = greedy(ref, prompt, STEPS)
    # Teacher-forced on fp32's greedy continuation: every step is compared on the same prefix.
    seq = prompt + tokens[:-1]
    p = ref.prefill_logits(seq)[len(prompt) - 1 :].float().log_softmax(-1)
    q = dep.prefill_logits(seq)[len(prompt) - 1 :].float().log_softmax(-1)
    assert p.shape == (STEPS, ref.cfg.vocab_size)
    agree = (p.argmax(-1) == q.argmax(-1)).float().mean().item()
    kl = (p.exp() * (p - q)).sum(-1)
    assert agree >= MIN_AGREEMENT, f"top-1 agreement {agree:.3f}"
    assert kl.mean() <= MAX_MEAN_KL and kl.max() <= MAX_KL, f"KL mean {kl.mean():.4f} max {kl.max():.4f}"
    bf = load_model(ckpt, precision="bf16", progress=False)
    r = bf.prefill_logits(seq)[len(prompt) - 1 :].float().log_softmax(-1)
    assert (p.argmax(-1) == r.argmax(-1)).float().mean() >= BF16_MIN_AGREEMENT
    assert (p.exp() * (p - r)).sum(-1).mean() <= BF16_MAX_MEAN_KL


def test_resident_bytes_equal_the_size_math(ckpt):
    replica = load_model(ckpt, with_experts=False, precision="deployed", progress=False, mtp=False)
    cfg = replica.cfg
    held = resident_bytes([*replica.parameters(), *replica.buffers()])
    rope = sum(b.numel() * b.element_size() for n, b in replica.named_buffers() if n.endswith("inv_freq"))
    assert held - rope == sizing.dense_bytes(cfg, "deployed")
    whole = load_model(ckpt, precision="deployed", progress=False)
    held = resident_bytes([*whole.parameters(), *whole.buffers()])
    rope = sum(b.numel() * b.element_size() for n, b in whole.named_buffers() if n.endswith("inv_freq"))
    assert held - rope == sizing.weight_bytes(cfg, "deployed", mtp=True)
    slots = [[0, 3, 5]] * cfg.num_hidden_layers
    shard = ShardExperts.from_checkpoint(cfg, slots, str(ckpt), "deployed")
    assert shard.nbytes() == 3 * cfg.num_hidden_layers * sizing.expert_bytes(cfg, "deployed")
    fp32 = load_model(ckpt, with_experts=False, precision="fp32", progress=False, mtp=False)
    assert resident_bytes(fp32.parameters()) > 2 * sizing.dense_bytes(cfg, "deployed")  # embed + head: bf16 x 2


def test_shard_experts_match_the_model_in_every_precision(ckpt):
    """A shard's packed stacks compute what the whole deployed model's LocalExperts compute."""
    model = load_model(ckpt, precision="deployed", progress=False)
    cfg = model.cfg
    slots = [[2, 0, 7, 2]] * cfg.num_hidden_layers  # expert 2 twice: both slots get its weights
    shard = ShardExperts.from_checkpoint(cfg, slots, str(ckpt), "deployed")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, cfg.hidden_size, generator=g).bfloat16()
    local = torch.tensor([[0, 1], [2, 3], [1, -1], [3, 0], [2, 2]])
    w = torch.rand(5, 2, generator=g)
    glob = torch.tensor(slots[1])[local.clamp(min=0)].where(local >= 0, -1)
    torch.testing.assert_close(shard.compute(1, x, local, w), model.experts(1, x, glob, w))
    fp32 = ShardExperts.from_checkpoint(cfg, slots, str(ckpt), "fp32")
    assert fp32.weights[1][0].dtype == torch.float32
    torch.testing.assert_close(
        fp32.compute(1, x.float(), local, w), model.experts(1, x, glob, w).float(), atol=0.05, rtol=0.05
    )


def test_generate_cli_takes_a_precision(ckpt):
    import json

    from click.testing import CliRunner

    from v4d.operator.cli import main

    def run(*extra):
        res = CliRunner().invoke(
            main, ["generate", str(ckpt), "--token-ids", "1,2,3", "--max-new-tokens", "3", "--json", *extra]
        )
        return res

    fp32, dep = run("--precision", "fp32"), run("--precision", "deployed", "--device", "cpu")
    assert fp32.exit_code == 0 and dep.exit_code == 0, fp32.output + dep.output
    a, b = json.loads(fp32.stdout)["logits"][0], json.loads(dep.stdout)["logits"][0]
    assert a != b and torch.allclose(torch.tensor(a), torch.tensor(b), atol=0.5)
    bad = run("--precision", "fp8")
    assert bad.exit_code == 2 and "'fp8' is not one of" in bad.output


def test_precision_names_agree_and_resolve():
    from typing import get_args

    from v4d.operator.api import ModelSpec
    from v4d.serving.precision import PRECISIONS, resolve_precision

    assert get_args(ModelSpec.model_fields["precision"].annotation) == PRECISIONS
    assert [resolve_precision("auto", d) for d in ("cpu", "cuda", "npu")] == ["fp32", "deployed", "deployed"]
    assert resolve_precision("bf16", "cuda") == "bf16"
    with pytest.raises(ValueError, match="precision: expected one of auto, deployed, bf16, fp32, got 'int4'"):
        resolve_precision("int4", "cpu")


def test_memory_bench_rows_within_five_percent(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "bench" / "memory.py"
    proc = subprocess.run(
        [sys.executable, str(bench), "--json", "--models", "v4-tiny", "--out", str(tmp_path / "m.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    assert {(r["model"], r["role"]) for r in rows} == {("v4-tiny", "replica"), ("v4-tiny", "shard")}
    for r in rows:
        assert {"model", "role", "resident_bytes", "planned_bytes"} <= set(r)
        assert abs(r["resident_bytes"] / r["planned_bytes"] - 1) <= 0.05, r


def test_engine_serves_the_deployed_model(ckpt):
    """The engine allocates its KV cache in the deployed format on the model's device and generates
    what the deployed model itself generates greedily with that cache format."""
    import asyncio

    from v4d.serving.engine.engine import Engine, EngineLimits
    from v4d.serving.sizing import page_bytes, slot_bytes

    model = load_model(ckpt, precision="deployed", progress=False, mtp=False)
    cfg = model.cfg
    budget = 3 * slot_bytes(cfg, "deployed") + 4 * page_bytes(cfg, "deployed")
    eng = Engine(model, EngineLimits(budget, 2, 64, 4, 512, prefix_snapshots=1))
    assert eng.kv.fmt == "deployed" and eng.kv.num_pages == 4
    prompt = [1, 17, 250, 33, 901, 5, 77, 300]

    async def run():
        out = []
        async for item in eng.generate({"prompt_token_ids": prompt, "max_tokens": 6, "ignore_eos": True}):
            out += item["token_ids"]
        return out

    assert asyncio.run(run()) == greedy(model, prompt, 6, "deployed")
