"""The deployed KV format: byte layout, rounding bounds, exactness within the format, deviation from
fp32, and the engine's capacity against the planner's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers.models import build

from v4d.kernels import kv_format
from v4d.operator.planner import plan
from v4d.serving import sizing
from v4d.serving.config import PRESETS, ModelConfig, get_preset
from v4d.serving.engine.engine import EngineLimits, kv_layout
from v4d.serving.model.cache import KVCache, SeqCache
from v4d.serving.model.step import Step

from .test_model_equivalence import TOL, run_chunks

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_main_entry_layout_and_fp8_rounding():
    x = torch.randn(50, 512, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 50)[:, None]
    packed = kv_format.pack_main(x, 64)
    assert packed.dtype == torch.uint8 and packed.shape == (50, 584)  # 448 + 128 + 7 scales + 1 pad
    back = kv_format.unpack_main(packed, 512, 64)
    # rope dims: bf16; nope dims: E4M3 (3 mantissa bits) under a power-of-two scale per 64 values
    torch.testing.assert_close(back[:, 448:], x[:, 448:].bfloat16().float(), atol=0, rtol=0)
    group_max = x[:, :448].abs().unflatten(1, (7, 64)).amax(-1).repeat_interleave(64, 1)
    assert ((back[:, :448] - x[:, :448]).abs() <= group_max * 2**-4 + 1e-30).all()
    assert torch.equal(kv_format.unpack_main(kv_format.pack_main(back, 64), 512, 64), back)  # idempotent


def test_indexer_key_layout_fp4_and_hadamard():
    x = torch.randn(20, 128, generator=torch.Generator().manual_seed(1))
    r = kv_format.hadamard(x)
    torch.testing.assert_close(kv_format.hadamard(r), x, atol=1e-5, rtol=0)  # orthogonal and symmetric
    torch.testing.assert_close(r.norm(dim=1), x.norm(dim=1))
    packed = kv_format.pack_index(r)
    assert packed.shape == (20, 68)  # 64 B of E2M1 + 4 UE8M0 scales
    back = kv_format.unpack_index(packed, 128)
    scale = r.abs().unflatten(1, (4, 32)).amax(-1).repeat_interleave(32, 1)
    assert ((back - r).abs() <= scale * 0.25 + 1e-6).all()  # half the widest E2M1 step (2) of 6 * scale
    unit = torch.exp2(packed[:, 64:].float() - 127).repeat_interleave(32, 1)
    assert torch.isin(back.abs() / unit, torch.tensor(kv_format.FP4_GRID)).all()  # on the E2M1 grid
    assert torch.equal(kv_format.unpack_index(kv_format.pack_index(back), 128), back)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_deployed_cache_allocates_exactly_the_planned_bytes(name):
    cfg = get_preset(name)
    if cfg.num_hidden_layers > 8:  # the real models: the byte math only (no allocation)
        assert sizing.main_entry_bytes(cfg) == kv_format.main_bytes(cfg.head_dim, cfg.qk_rope_head_dim) == 584
        assert sizing.indexer_entry_bytes(cfg) == kv_format.index_bytes(cfg.index_head_dim) == 68
        return
    kv = KVCache(cfg, 3, 2, fmt="deployed")
    assert kv.page_nbytes == sizing.page_bytes(cfg, "deployed")
    assert kv.slot_nbytes == sizing.slot_bytes(cfg, "deployed")


def test_chunked_equals_one_pass_within_the_deployed_format_and_deviation_from_fp32_is_bounded(tiny_fast, tokens):
    ids = tokens[:120]
    cfg = tiny_fast.cfg
    pages = sizing.pages_for(cfg, len(ids))

    def one_pass(fmt):
        kv = KVCache(cfg, pages, 1, fmt=fmt)
        return tiny_fast([(ids, SeqCache(0, list(range(pages))))], kv, all_logits=True)[0]

    deployed, fp32 = one_pass("deployed"), one_pass("fp32")
    # chunked prefill + decode in the deployed format reproduces its own one-pass logits: every
    # entry is rounded once, when it is written, whichever chunk writes it
    kv = KVCache(cfg, pages + 2, 3, fmt="deployed")
    seq = SeqCache(slot=2, page_ids=list(range(pages + 1, 1, -1)))
    chunked = torch.cat(
        [
            tiny_fast([(ids[lo:hi], seq)], kv, all_logits=True)[0]
            for lo, hi in ((0, 37), (37, 38), (38, 90), *((i, i + 1) for i in range(90, 120)))
        ]
    )
    torch.testing.assert_close(chunked, deployed, **TOL)
    assert torch.equal(run_chunks(tiny_fast, ids, [120], 120), fp32)
    # against fp32 storage (random weights: greedy choices are near ties, so this is loose; the
    # per-layer bound below is the tight one)
    rel = ((deployed - fp32).norm(dim=-1) / fp32.norm(dim=-1)).mean()
    assert 0 < rel < 0.3, f"deployed-format logits deviate by {rel:.3f} (relative L2, mean over positions)"


@torch.inference_mode()
@pytest.mark.parametrize("layer", [0, 2, 3])
def test_one_layer_in_the_deployed_format_stays_within_5pct_of_fp32(layer):
    """SWA, CSA (top-k wider than the visible blocks, so the FP4 keys cannot change the selection)
    and HCA: the FP8 entries move a layer's output by about 3% (relative L2)."""
    model = build("v4-tiny-fast", seed=3, index_topk=64)
    cfg = model.cfg
    x = torch.randn(120, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    pages = sizing.pages_for(cfg, 120)
    out = {}
    for fmt in ("deployed", "fp32"):
        kv = KVCache(cfg, pages, 1, fmt=fmt)
        out[fmt] = model.layers[layer].attn(
            x, Step.build(cfg, [(0, 120, 0, list(range(pages)))], 1, "cpu"), kv.layer(layer)
        )
    rel = (out["deployed"] - out["fp32"]).norm() / out["fp32"].norm()
    assert 0 < rel < 0.05, f"layer {layer}: {rel:.4f}"


@pytest.mark.parametrize("example", ["flash-h200.yaml", "pro-h200-ascend.yaml"])
def test_engine_capacity_for_the_planned_budget_equals_the_planner_within_2pct(example):
    manifest = yaml.safe_load((EXAMPLES / example).read_text())
    p = plan(manifest["spec"], name="cap")
    e, cfg = p.engine, ModelConfig.from_dict(p.config)
    pages, _, _ = kv_layout(cfg, EngineLimits.from_plan(e, p.max_context_tokens))
    engine_tokens = pages * sizing.page_tokens(cfg)
    assert abs(engine_tokens - p.kv.capacity_tokens_per_replica) <= 0.02 * p.kv.capacity_tokens_per_replica
