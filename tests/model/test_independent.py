"""v4d against an independent DeepSeek-V4 implementation: Hugging Face transformers' `DeepseekV4ForCausalLM`.

Random transformers weights with every feature on (SWA, CSA with top-k below the visible blocks, HCA,
hash-routed first layers, mHC, YaRN, shared and routed experts pushed past `swiglu_limit`) are saved
with `save_pretrained`, renamed to the official layout, given an official `config.json` and loaded by
v4d's loader. Prefill logits and 8 greedy decode steps must agree within 1e-5 relative in fp32, with
reduced ratios (window 8, HCA 16) and with the real ones (window 128, CSA 4, HCA 128).

transformers quirks handled here, not in the product:
- `save_pretrained` reverses its `.norm.` -> `.kv_norm.` load rename everywhere, so the attention's
  own `attn.kv_norm` comes out as `attn.norm`; it also keeps `model.embed_tokens`, `model.hc_head.hc_*`.
- its CSA indexer calls `Tensor.topk`, whose order among equal scores is unspecified (CPU keeps
  other indices than CUDA); ties are common (ReLU scores of 0). v4d keeps the lowest index
  (docs/model.md), so transformers runs with a `topk` that breaks ties the same way.
- `generate` without an attention mask masks every prompt token equal to `pad_token_id` as padding.
- it imports the `kernels` package, which the checkout's `kernels/` folder can shadow (below).
"""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from v4d.serving.config import TINY, RopeScaling
from v4d.serving.generate import generate
from v4d.serving.model.loader import load_model


def _import_transformers():
    """transformers imports the `kernels` package, which the checkout's own top-level `kernels/`
    folder (v4d.kernels) shadows when the repository root is on sys.path (`python -m pytest`):
    import both with the root left out, so the real package is the one cached."""
    root = Path(__file__).resolve().parents[2]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    try:
        importlib.import_module("kernels")
        return importlib.import_module("transformers")
    finally:
        sys.path[:] = saved


transformers = _import_transformers()
LIMIT = 10.0
STEPS = 8
# 5 layers: SWA, CSA, HCA, CSA, HCA; the first two hash-routed; indexer top-k 4 of the visible blocks.
BASE = replace(
    TINY,
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=5,
    num_attention_heads=4,
    head_dim=32,
    qk_rope_head_dim=8,
    q_lora_rank=32,
    o_groups=2,
    o_lora_rank=16,
    index_n_heads=2,
    index_head_dim=16,
    index_topk=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    num_hash_layers=2,
    swiglu_limit=LIMIT,
    num_nextn_predict_layers=0,
    max_position_embeddings=1024,  # = YaRN factor x original
    rope_scaling=RopeScaling(factor=16.0, original_max_position_embeddings=64),
)
CASES = {
    # window 8, HCA ratio 16: 96 tokens close 6 HCA and 24 CSA blocks
    "small-ratios": (replace(BASE, sliding_window=8, compress_ratios=(0, 4, 16, 4, 16)), 96),
    # the real window (128) and ratios (4, 128): 300 tokens close 2 HCA and 75 CSA blocks
    "real-ratios": (replace(BASE, sliding_window=128, compress_ratios=(0, 4, 128, 4, 128)), 300),
}
KINDS = {0: "sliding_attention", 4: "compressed_sparse_attention"}


def hf_model(c) -> torch.nn.Module:
    hca = max(c.compress_ratios)
    config = transformers.DeepseekV4Config(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        moe_intermediate_size=c.moe_intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=1,
        head_dim=c.head_dim,
        q_lora_rank=c.q_lora_rank,
        partial_rotary_factor=c.qk_rope_head_dim / c.head_dim,
        num_experts_per_tok=c.num_experts_per_tok,
        n_routed_experts=c.n_routed_experts,
        n_shared_experts=1,
        routed_scaling_factor=c.routed_scaling_factor,
        max_position_embeddings=c.max_position_embeddings,
        rope_theta=c.rope_theta,
        compress_rope_theta=c.compress_rope_theta,
        rope_parameters={
            "rope_type": "yarn",
            "factor": c.rope_scaling.factor,
            "original_max_position_embeddings": c.rope_scaling.original_max_position_embeddings,
            "beta_fast": c.rope_scaling.beta_fast,
            "beta_slow": c.rope_scaling.beta_slow,
        },
        layer_types=[KINDS.get(r, "heavily_compressed_attention") for r in c.compress_ratios],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": hca},
        mlp_layer_types=["hash_moe" if c.is_hash_layer(i) else "moe" for i in range(c.num_hidden_layers)],
        hc_mult=c.hc_mult,
        hc_sinkhorn_iters=c.hc_sinkhorn_iters,
        hc_eps=c.hc_eps,
        swiglu_limit=c.swiglu_limit,
        sliding_window=c.sliding_window,
        o_groups=c.o_groups,
        o_lora_rank=c.o_lora_rank,
        index_n_heads=c.index_n_heads,
        index_head_dim=c.index_head_dim,
        index_topk=c.index_topk,
        num_nextn_predict_layers=0,
        rms_norm_eps=c.rms_norm_eps,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
    )
    model = transformers.DeepseekV4ForCausalLM(config).float().eval()
    g = torch.Generator().manual_seed(0)

    def randn(shape, scale):
        return torch.randn(shape, generator=g) * scale

    with torch.no_grad():  # the library's init (std 0.02) leaves every activation near zero
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1] if not name.endswith(".weight") else name.rsplit(".", 2)[-2]
            if "norm" in leaf:
                p.copy_(1 + randn(p.shape, 0.1))  # not all ones: a norm applied in the wrong place shows
            elif leaf in ("fn", "hc_fn"):
                p.copy_(randn(p.shape, p.shape[1] ** -0.5))
            elif leaf in ("base", "hc_base", "sinks", "position_bias"):
                p.copy_(randn(p.shape, 0.5))
            elif leaf in ("scale", "hc_scale"):
                p.copy_(0.1 + 0.1 * torch.rand(p.shape, generator=g))
            elif leaf == "e_score_correction_bias":
                p.copy_(randn(p.shape, 0.1))
            elif leaf in ("gate_up_proj",) or name.endswith(
                ("shared_experts.gate_proj.weight", "shared_experts.up_proj.weight")
            ):
                p.copy_(randn(p.shape, 4 * p.shape[-1] ** -0.5))  # pre-activations reach past the limit
            else:
                p.copy_(randn(p.shape, p.shape[-1] ** -0.5))
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.rand(b.shape[0], c.n_routed_experts, generator=g).argsort(-1)[:, : b.shape[1]])
    return model


def official_name(name: str) -> str:
    """A `save_pretrained` tensor name -> the official one."""
    name = name.removeprefix("model.")
    name = {"embed_tokens.weight": "embed.weight"}.get(name, name)
    name = name.replace("hc_head.hc_", "hc_head_")
    return name.replace(".attn.norm.", ".attn.kv_norm.")  # quirk: the attention's kv_norm saved as norm


def stable_topk(self, k, dim=-1, largest=True, sorted=True):
    """`Tensor.topk` with ties broken towards the lowest index (v4d's rule; CUDA's for the tied rows)."""
    values, indices = torch.sort(self, dim=dim, descending=largest, stable=True)
    return torch.return_types.topk((values.narrow(dim, 0, k), indices.narrow(dim, 0, k)))


def rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest error of a logit vector over the smallest reference vector norm (rows = positions)."""
    return float((ours - ref).norm(dim=-1).max() / ref.norm(dim=-1).min())


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(transformers model, v4d model loaded from its checkpoint in the official layout, prompt)."""
    cfg, n_prompt = CASES[request.param]
    hf = hf_model(cfg)
    out = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(out / "hf")
    tensors = {}
    for f in sorted((out / "hf").glob("*.safetensors")):
        tensors.update({official_name(k): v for k, v in load_file(f).items()})
    assert "layers.0.attn.kv_norm.weight" in tensors and "layers.1.attn.indexer.compressor.ape" in tensors
    ckpt = out / "official"
    ckpt.mkdir()
    save_file(tensors, ckpt / "model.safetensors")
    config = cfg.to_dict()
    config["compress_ratios"] = [*cfg.compress_ratios, 0]  # the official length: one entry for an MTP layer
    (ckpt / "config.json").write_text(json.dumps(config))
    prompt = torch.randint(0, cfg.vocab_size, (n_prompt,), generator=torch.Generator().manual_seed(5)).tolist()
    return hf, load_model(ckpt, progress=False), prompt


def test_prefill_and_greedy_decode_equal_transformers(case, monkeypatch):
    hf, ours, prompt = case
    seen = []  # largest |pre-activation| of each shared expert, from the reference run
    hooks = [
        m.register_forward_hook(lambda _m, _i, o: seen.append(float(o.abs().max())))
        for n, m in hf.named_modules()
        if n.endswith(("shared_experts.gate_proj", "shared_experts.up_proj"))
    ]
    ids = torch.tensor([prompt])
    with torch.no_grad(), monkeypatch.context() as m:
        m.setattr(torch.Tensor, "topk", stable_topk)
        ref = hf(ids, use_cache=False).logits[0]
        for h in hooks:
            h.remove()
        gen = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=STEPS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert max(seen) > LIMIT  # the shared experts run into the clamp

    with torch.no_grad():
        logits = ours.prefill_logits(prompt)
        out = generate(ours, prompt, STEPS)
    assert rel(logits, ref) < 1e-5, f"prefill logits differ by {rel(logits, ref):.2e} relative"
    assert out.token_ids == gen.sequences[0, len(prompt) :].tolist()
    steps = torch.stack(gen.logits)[:, 0]
    decoded = torch.stack(out.logits)
    assert rel(decoded, steps) < 1e-5, f"decode logits differ by {rel(decoded, steps):.2e} relative"
