"""Model presets carry the official config values (docs/deepseek-v4.md §1.1) and round-trip through config.json."""

import json
import logging
from dataclasses import replace

import pytest

from v4d.serving.config import FLASH, PRESETS, PRO, TINY, ModelConfig, get_preset


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_json_round_trip(tmp_path, name):
    cfg = PRESETS[name]
    path = tmp_path / "config.json"
    cfg.to_json(path)
    data = json.loads(path.read_text())
    for key in (
        "compress_ratios",
        "index_topk",
        "hc_mult",
        "o_groups",
        "o_lora_rank",
        "num_hash_layers",
        "scoring_func",
        "num_nextn_predict_layers",
        "quantization_config",
    ):
        assert key in data
    assert ModelConfig.from_json(path) == cfg


def test_layer_schedules_section_1_1():
    # §1.1: Flash 2 SWA / 21 CSA / 20 HCA; Pro 0 / 30 / 31; the MTP layer is SWA-only.
    assert [FLASH.count_layers(k) for k in ("swa", "csa", "hca")] == [2, 21, 20]
    assert [PRO.count_layers(k) for k in ("swa", "csa", "hca")] == [0, 30, 31]
    assert FLASH.layer_kind(43) == "swa" and PRO.layer_kind(61) == "swa"
    assert PRO.layer_kind(0) == PRO.layer_kind(1) == "hca" and PRO.layer_kind(2) == "csa"
    assert [FLASH.is_hash_layer(i) for i in range(4)] == [True, True, True, False]


def test_official_values_section_1_1():
    assert (FLASH.hidden_size, FLASH.num_attention_heads, FLASH.q_lora_rank, FLASH.o_groups) == (
        4096,
        64,
        1024,
        8,
    )
    assert (PRO.hidden_size, PRO.num_attention_heads, PRO.q_lora_rank, PRO.o_groups) == (7168, 128, 1536, 16)
    assert (FLASH.n_routed_experts, PRO.n_routed_experts, FLASH.index_topk, PRO.index_topk) == (
        256,
        384,
        512,
        1024,
    )
    assert (FLASH.routed_scaling_factor, PRO.routed_scaling_factor) == (1.5, 2.5)
    assert FLASH.moe_intermediate_size == 2048 and PRO.moe_intermediate_size == 3072
    assert FLASH.max_position_embeddings == PRO.max_position_embeddings == 1_048_576


def test_tiny_keeps_the_structure():
    kinds = TINY.main_layer_kinds
    assert {"swa", "csa", "hca"} <= set(kinds) and TINY.num_nextn_predict_layers == 1 and TINY.hc_mult == 4
    assert TINY.num_hash_layers > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"compress_ratios": [0, 4]}, "compress_ratios: expected at least 6 entries"),
        ({"compress_ratios": [0, 0, 4, 5, 4, 128, 0]}, "compress_ratios: entries must be 0 (SWA), 4 (CSA)"),
        ({"o_groups": 3}, "o_groups: must divide num_attention_heads"),
        ({"hidden_size": 0}, "hidden_size: must be positive, got 0"),
        ({"num_experts_per_tok": 99}, "num_experts_per_tok: cannot exceed n_routed_experts"),
    ],
)
def test_check_names_the_key(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig.from_dict({**TINY.to_dict(), **change})


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset 'v5'"):
        get_preset("v5")


def test_compress_ratios_of_the_official_length_load_with_or_without_mtp(caplog):
    official = list(TINY.compress_ratios)  # num_hidden_layers + 1 entries, the last for the MTP layer
    assert len(official) == TINY.num_hidden_layers + 1
    with caplog.at_level(logging.INFO, logger="v4d.serving.config"):
        no_mtp = ModelConfig.from_dict({**TINY.to_dict(), "num_nextn_predict_layers": 0, "compress_ratios": official})
    assert no_mtp.compress_ratios == TINY.compress_ratios[:-1] and no_mtp.main_layer_kinds == TINY.main_layer_kinds
    assert "compress_ratios: 7 entries, using the first 6" in caplog.text
    longer = ModelConfig.from_dict({**TINY.to_dict(), "compress_ratios": official + [4, 4]})
    assert longer.compress_ratios == TINY.compress_ratios
    two_mtp = ModelConfig.from_dict({**TINY.to_dict(), "num_nextn_predict_layers": 2, "compress_ratios": official})
    assert two_mtp.compress_ratios == (*TINY.compress_ratios, 0)
    with pytest.raises(ValueError, match=r"compress_ratios: expected at least 6 entries .* got 5"):
        ModelConfig.from_dict({**TINY.to_dict(), "num_nextn_predict_layers": 0, "compress_ratios": official[:5]})
    # a config built in code must still match exactly
    with pytest.raises(ValueError, match="compress_ratios: expected 7 entries"):
        replace(TINY, compress_ratios=official + [0]).check()
