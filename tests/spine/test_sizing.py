"""Size math reproduces the fact sheet (docs/deepseek-v4.md §1 and §3) from the configs alone."""

import pytest

from v4d.serving import sizing
from v4d.serving.config import FLASH, PRO, TINY, TINY_FAST

GiB = 2**30
N_1M = 1_048_576


def test_param_counts_match_sheet_section_1_2():
    # §1.2: Flash 284.3B without MTP, 290.9B with; Pro 1,573B / 1,598.8B; activated ~13.3B / ~48.9B.
    assert round(sizing.params_total(FLASH) / 1e9, 1) == 284.3
    assert round(sizing.params_total(FLASH, mtp=True) / 1e9, 1) == 290.9
    assert round(sizing.params_total(PRO) / 1e12, 3) == 1.573
    assert round(sizing.params_total(PRO, mtp=True) / 1e9, 1) == 1598.8
    assert round(sizing.params_total(PRO, mtp=True) / 1e12, 3) == 1.599
    assert round(sizing.params_active(FLASH) / 1e9, 1) == 13.3
    assert round(sizing.params_active(PRO) / 1e9, 1) == 48.9


def test_param_counts_match_checkpoint_audit_to_the_unit():
    # §1.2 [S19]: 290,942,289,362 (Flash) and 1,598,837,347,742 (Pro) logical params including MTP;
    # reproduced exactly when the hash layers' int32 tid2eid table is not counted as a parameter.
    assert sizing.params_total(FLASH, mtp=True) == 290_942_289_362
    assert sizing.params_total(PRO, mtp=True) == 1_598_837_347_742


def test_blocks_only_and_embedding_inclusive_active_counts():
    # §1.2: Flash 283.3B in the blocks, Pro 1,571B; activated with the embedding ~13.8B / ~49.8B.
    for cfg, blocks, active_emb in ((FLASH, 283.3, 13.8), (PRO, 1571, 49.8)):
        ts = sizing.model_tensors(cfg)
        in_blocks = sum(t.numel for t in ts if t.is_param and t.name.startswith("layers."))
        assert round(in_blocks / 1e9, 1 if blocks < 1000 else 0) == blocks
        emb = next(t.numel for t in ts if t.name == "embed.weight")
        assert round((sizing.params_active(cfg) + emb) / 1e9, 1) == active_emb


def test_routed_expert_params_per_layer():
    # §1.2: Flash 256 x 3 x 4096 x 2048 = 6.44B per MoE layer, Pro 384 x 3 x 7168 x 3072 = 25.4B.
    for cfg, billions in ((FLASH, 6.44), (PRO, 25.4)):
        routed = sum(t.numel for t in sizing.block_tensors(cfg, 5) if t.part == "routed")
        assert round(routed / 1e9, 2 if billions < 10 else 1) == billions


def test_deployed_weight_bytes_match_checkpoint_size():
    # §1.1: checkpoint on disk ~159.6 GB (Flash) and ~864.7 GB (Pro), i.e. with the MTP block.
    assert round(sizing.weight_bytes(FLASH, "deployed", mtp=True) / 1e9, 1) == 159.6
    assert round(sizing.weight_bytes(PRO, "deployed", mtp=True) / 1e9, 1) == 864.7
    # BF16 is ~2 bytes per parameter (fp32 tensors stay fp32, so slightly above).
    for cfg in (FLASH, PRO):
        ratio = sizing.weight_bytes(cfg, "bf16") / sizing.params_total(cfg)
        assert 2.0 < ratio < 2.01


def test_expert_and_dense_bytes_partition_the_model():
    for cfg in (FLASH, PRO, TINY):
        for fmt in sizing.FORMATS:
            routed = sizing.expert_bytes(cfg, fmt) * cfg.n_routed_experts * cfg.num_hidden_layers
            assert routed + sizing.dense_bytes(cfg, fmt) == sizing.weight_bytes(cfg, fmt)
    # MXFP4: 0.5 B/param + 1 B per 32 -> 3 x 4096 x 2048 x (1/2 + 1/32) for one Flash expert.
    assert sizing.expert_bytes(FLASH) == 3 * 4096 * 2048 * 17 // 32


def test_kv_entry_and_per_token_bytes_section_3_1():
    # §3.1: 584 B main entry, 68 B FP4 indexer key; CSA 163 B/token/layer, HCA 4.56 B deployed; 320 / 8 BF16.
    assert sizing.main_entry_bytes(PRO) == 584 and sizing.indexer_entry_bytes(PRO) == 68
    by_kind = sizing.kv_bytes_per_token_by_kind(PRO)
    assert by_kind["csa"] == 163 and round(by_kind["hca"], 2) == 4.56 and by_kind["swa"] == 0
    bf16 = sizing.kv_bytes_per_token_by_kind(FLASH, "bf16")
    assert bf16["csa"] == 320 and bf16["hca"] == 8
    # Totals: Pro ~5,031 B, Flash ~3,514 B per token.
    assert round(sizing.kv_bytes_per_token(PRO)) == 5031
    assert round(sizing.kv_bytes_per_token(FLASH)) == 3514


def test_whole_sequence_cache_at_1m_tokens_section_3_2():
    # §3.2: Pro 4.92 GiB deployed / 9.62 GiB BF16; Flash 3.43 / 6.72 GiB.
    assert round(sizing.kv_bytes_at_context(PRO, N_1M) / GiB, 2) == 4.92
    assert round(sizing.kv_bytes_at_context(FLASH, N_1M) / GiB, 2) == 3.43
    assert round(sizing.kv_bytes_at_context(PRO, N_1M, "bf16") / GiB, 2) == 9.62
    assert round(sizing.kv_bytes_at_context(FLASH, N_1M, "bf16") / GiB, 2) == 6.72
    # §3.2: at 128K Pro 0.62 / Flash 0.43 GiB; at 256K 1.23 / 0.86 GiB.
    assert round(sizing.kv_bytes_at_context(PRO, 131072) / GiB, 2) == 0.62
    assert round(sizing.kv_bytes_at_context(FLASH, 131072) / GiB, 2) == 0.43
    assert round(sizing.kv_bytes_at_context(PRO, 262144) / GiB, 2) == 1.23
    assert round(sizing.kv_bytes_at_context(FLASH, 262144) / GiB, 2) == 0.86


def test_ratios_vs_baselines_section_3_3():
    # §3.3: 10.5% (Pro) and 7.3% (Flash) of V3.2; both 2.0% of GQA-8; V3.2 itself 46.9 GiB, GQA-8 244 / 172 GiB.
    pro, flash = sizing.model_info(PRO, N_1M), sizing.model_info(FLASH, N_1M)
    assert round(pro["kv_ratio_vs_v32"]["deployed"] * 100, 1) == 10.5
    assert round(flash["kv_ratio_vs_v32"]["deployed"] * 100, 1) == 7.3
    assert round(pro["kv_ratio_vs_gqa8"]["deployed"] * 100, 1) == 2.0
    assert round(flash["kv_ratio_vs_gqa8"]["deployed"] * 100, 1) == 2.0
    assert round(pro["kv_bytes_at_context_v32"]["deployed"] / GiB, 1) == 46.9
    assert round(pro["kv_bytes_at_context_v32"]["bf16"] / GiB, 1) == 83.9
    assert round(pro["kv_bytes_at_context_gqa8"] / GiB) == 244
    assert round(flash["kv_bytes_at_context_gqa8"] / GiB) == 172
    # §3.3: BF16 vs BF16 is 8.7x smaller for Pro (vLLM's figure).
    assert round(1 / pro["kv_ratio_vs_v32"]["bf16"], 1) == 8.7


def test_per_request_state_section_3_4():
    # §3.4: fp32 compressor state + FP8 window: ~14.7 MiB (Flash), ~22.2 MiB (Pro) per request.
    assert sizing.slot_bytes(FLASH) == 43 * 128 * 584 + 20 * 2 * 128 * 512 * 4 + 21 * 2 * 8 * (1024 + 256) * 4
    assert round(sizing.slot_bytes(FLASH) / 2**20, 1) == 14.7
    assert round(sizing.slot_bytes(PRO) / 2**20, 1) == 22.2


@pytest.mark.parametrize("cfg", [FLASH, PRO, TINY, TINY_FAST], ids=["flash", "pro", "tiny", "tiny-fast"])
def test_pages_hold_exactly_the_per_token_bytes(cfg):
    # §7.1: a page covers lcm(m, m') = 128 tokens (32 CSA + 1 HCA entry per layer); no padding analytically.
    tokens = sizing.page_tokens(cfg)
    assert tokens == 128
    for fmt in sizing.FORMATS:
        assert sizing.page_bytes(cfg, fmt) == sizing.kv_bytes_per_token(cfg, fmt) * tokens
        # n whole pages hold exactly the compressed part of kv_bytes_at_context.
        n = 5 * tokens
        window = cfg.num_hidden_layers * cfg.sliding_window * sizing.main_entry_bytes(cfg, fmt)
        assert sizing.kv_bytes_at_context(cfg, n, fmt) - window == sizing.pages_for(cfg, n) * sizing.page_bytes(
            cfg, fmt
        )


def test_pro_page_layout():
    # Pro deployed page: 30 CSA x 32 x (584 + 68) + 31 HCA x 1 x 584.
    assert sizing.page_bytes(PRO) == 30 * 32 * (584 + 68) + 31 * 584


def test_model_info_has_the_cli_keys():
    info = sizing.model_info(TINY, 4096)
    for key in (
        "params_total",
        "params_total_with_mtp",
        "params_active",
        "weight_bytes",
        "kv_bytes_per_token",
        "kv_bytes_at_context",
        "kv_ratio_vs_v32",
        "kv_ratio_vs_gqa8",
    ):
        assert key in info
    assert set(info["kv_bytes_at_context"]) == {"deployed", "bf16"}
    assert info["context_tokens"] == 4096
    # v4-tiny is "a few million parameters".
    assert 1e6 < info["params_total_with_mtp"] < 10e6
