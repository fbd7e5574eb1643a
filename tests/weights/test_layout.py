"""The official checkpoint layout: names, shapes and formats as the released files have them."""

import math

from v4d.serving.config import FLASH, PRO, TINY
from v4d.serving.model.layout import expert_of, inference_name, official_layout, scale_name


def test_parameter_counts_match_the_checkpoint_audit():
    # docs/deepseek-v4.md §1.2: 290,942,289,362 (Flash) and 1,598,837,347,742 (Pro) logical params with MTP
    for cfg, expect in ((FLASH, 290_942_289_362), (PRO, 1_598_837_347_742)):
        layout = official_layout(cfg)
        assert sum(math.prod(t.shape) for t in layout.values() if t.storage != "int32") == expect


def test_flash_mtp_namespace_matches_the_released_shard():
    # The released Flash MTP namespace holds 797 tensors, 778 of them with a scale sidecar.
    mtp = {n: t for n, t in official_layout(FLASH).items() if n.startswith("mtp.")}
    assert len(mtp) == 797
    assert sum(t.storage in ("fp8", "fp4") for t in mtp.values()) == 778


def test_tiny_names_formats_and_kinds():
    layout = official_layout(TINY)
    assert layout["embed.weight"].storage == "bf16" and layout["head.weight"].shape == (1024, 128)
    assert layout["layers.0.ffn.gate.tid2eid"].storage == "int32"  # hash layer
    assert "layers.0.ffn.gate.bias" not in layout and "layers.2.ffn.gate.bias" in layout
    assert layout["layers.2.attn.indexer.wq_b.weight"].storage == "fp8"  # CSA layer has an indexer
    assert "layers.3.attn.indexer.wq_b.weight" not in layout  # HCA has none
    assert layout["layers.2.attn.compressor.ape"].shape == (4, 128)  # overlapped: two halves
    assert layout["layers.3.attn.compressor.ape"].shape == (128, 64)
    assert "layers.0.attn.compressor.ape" not in layout  # SWA-only
    assert layout["layers.5.ffn.experts.15.w2.weight"].storage == "fp4"
    assert layout["layers.5.ffn.shared_experts.w2.weight"].storage == "fp8"
    assert layout["mtp.0.e_proj.weight"].storage == "fp8" and "mtp.0.ffn.gate.bias" in layout
    assert "mtp.0.attn.compressor.ape" not in layout and "layers.6.attn_norm.weight" not in layout
    assert sum(1 for n in layout if expert_of(n, TINY)) == 3 * 16 * 7


def test_expert_of_and_scale_name():
    assert expert_of("layers.3.ffn.experts.12.w1.weight", TINY) == (3, 12)
    assert expert_of("mtp.0.ffn.experts.5.w2.weight", TINY) == (6, 5)
    assert expert_of("layers.3.ffn.shared_experts.w1.weight", TINY) is None
    assert scale_name("layers.3.attn.wq_a.weight") == "layers.3.attn.wq_a.scale"


def test_inference_names_of_file_keys():
    assert inference_name("layers.3.attn.wq_a.weight") == "layers.3.attn.wq_a.weight"  # released: identity
    assert inference_name("mtp.0.hc_head_fn") == "mtp.0.hc_head_fn"
    assert inference_name("model.layers.3.self_attn.q_b_proj.weight_scale_inv") == "layers.3.attn.wq_b.scale"
    assert inference_name("model.layers.3.post_attention_layernorm.weight") == "layers.3.ffn_norm.weight"
    assert (
        inference_name("model.layers.3.mlp.shared_experts.down_proj.weight") == "layers.3.ffn.shared_experts.w2.weight"
    )
    assert inference_name("model.norm.weight") == "norm.weight"
    assert inference_name("mtp.0.emb.tok_emb.weight") is None and inference_name("mtp.0.head.weight") is None
