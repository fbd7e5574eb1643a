"""DeepSeek-V4 model configuration: presets, HF-style `config.json` I/O, layer schedule.

Torch-free on purpose: the operator and the planner import this module, and the operator image
carries no torch. Field names are the official `config.json` keys (docs/deepseek-v4.md §1.1), so a
real checkpoint's config loads unchanged and `to_json()` writes one a real loader accepts.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

LayerKind = Literal["swa", "csa", "hca"]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RopeScaling:
    """YaRN settings used on compressed (CSA/HCA) layers; SWA-only layers use plain RoPE."""

    type: str = "yarn"
    factor: float = 16.0
    original_max_position_embeddings: int = 65536
    beta_fast: int = 32
    beta_slow: int = 1


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    # One entry per main layer plus one for each MTP layer (0 = SWA-only, 4 = CSA, 128 = HCA).
    compress_ratios: tuple[int, ...] = ()
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    num_hash_layers: int = 3
    scoring_func: str = "sqrtsoftplus"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    num_nextn_predict_layers: int = 1
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    max_position_embeddings: int = 1048576
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    rms_norm_eps: float = 1e-6
    bos_token_id: int = 0
    eos_token_id: int = 1
    tie_word_embeddings: bool = False
    # Deployed weight formats: FP8 block-scaled everywhere, MXFP4 routed experts.
    expert_dtype: str | None = "fp4"
    weight_block_size: tuple[int, int] = (128, 128)

    # -- layer schedule -------------------------------------------------------------------
    def layer_kind(self, layer: int) -> LayerKind:
        """Attention kind of main layer `layer`, or of MTP layer `num_hidden_layers + k`."""
        ratio = self.compress_ratios[layer]
        if ratio == 0:
            return "swa"
        # Ratio 4 is the overlapped CSA compressor (as in the official code); larger ratios are HCA.
        return "csa" if ratio == 4 else "hca"

    @property
    def main_layer_kinds(self) -> list[LayerKind]:
        return [self.layer_kind(i) for i in range(self.num_hidden_layers)]

    def count_layers(self, kind: LayerKind) -> int:
        return self.main_layer_kinds.count(kind)

    def is_hash_layer(self, layer: int) -> bool:
        """The first `num_hash_layers` main layers route by token id; MTP layers never do."""
        return layer < min(self.num_hash_layers, self.num_hidden_layers)

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    # -- config.json ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["compress_ratios"] = list(self.compress_ratios)
        block = list(d.pop("weight_block_size"))
        d["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "scale_fmt": "ue8m0",
            "activation_scheme": "dynamic",
            "weight_block_size": block,
        }
        d["architectures"] = ["DeepseekV4ForCausalLM"]
        d["model_type"] = "deepseek_v4"
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from an HF-style config; unknown keys are ignored, missing ones take defaults."""
        known = {f.name for f in fields(cls)}
        kw: dict[str, Any] = {k: v for k, v in data.items() if k in known}
        if "compress_ratios" in kw:
            n_layers = kw.get("num_hidden_layers", cls.num_hidden_layers)
            n_mtp = kw.get("num_nextn_predict_layers", cls.num_nextn_predict_layers)
            kw["compress_ratios"] = _fit_ratios(tuple(int(r) for r in kw["compress_ratios"]), n_layers, n_mtp)
        if isinstance(kw.get("rope_scaling"), dict):
            rs_known = {f.name for f in fields(RopeScaling)}
            kw["rope_scaling"] = RopeScaling(**{k: v for k, v in kw["rope_scaling"].items() if k in rs_known})
        qc = data.get("quantization_config") or {}
        if "weight_block_size" in qc:
            kw["weight_block_size"] = tuple(qc["weight_block_size"])
        cfg = cls(**kw)
        cfg.check()
        return cfg

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def check(self) -> None:
        """Raise ValueError naming the key when the config cannot describe a V4 model."""
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        expect = self.num_hidden_layers + self.num_nextn_predict_layers
        if len(self.compress_ratios) != expect:
            raise ValueError(
                f"compress_ratios: expected {expect} entries (num_hidden_layers + num_nextn_predict_layers), "
                f"got {len(self.compress_ratios)}"
            )
        bad = sorted({r for r in self.compress_ratios if r not in (0, 4) and r < 8})
        if bad:
            raise ValueError(f"compress_ratios: entries must be 0 (SWA), 4 (CSA) or an HCA ratio >= 8, got {bad}")
        if self.num_attention_heads % self.o_groups:
            raise ValueError("o_groups: must divide num_attention_heads")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError("num_experts_per_tok: cannot exceed n_routed_experts")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > self.head_dim:
            raise ValueError("qk_rope_head_dim: must be even and at most head_dim")
        if self.index_head_dim < self.qk_rope_head_dim:
            raise ValueError("index_head_dim: must be at least qk_rope_head_dim")
        if self.scoring_func != "sqrtsoftplus":
            raise ValueError(f"scoring_func: only 'sqrtsoftplus' is supported, got {self.scoring_func!r}")


_POSITIVE = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "head_dim",
    "q_lora_rank",
    "o_groups",
    "o_lora_rank",
    "sliding_window",
    "index_n_heads",
    "index_head_dim",
    "index_topk",
    "n_routed_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "hc_mult",
    "hc_sinkhorn_iters",
    "max_position_embeddings",
)


def _fit_ratios(ratios: tuple[int, ...], n_layers: int, n_mtp: int) -> tuple[int, ...]:
    """`compress_ratios` of a config.json, fitted to the layers it describes.

    Official files carry num_hidden_layers + 1 entries (the last one for the MTP layer), and tools
    that drop MTP (`num_nextn_predict_layers: 0`) keep that length: extra trailing entries are
    ignored. MTP layers without an entry are SWA-only (0), as in every official schedule.
    """
    want = n_layers + n_mtp
    if len(ratios) < n_layers:
        raise ValueError(
            f"compress_ratios: expected at least {n_layers} entries (one per main layer, "
            f"num_hidden_layers {n_layers}; then one per MTP layer), got {len(ratios)}"
        )
    if len(ratios) > want:
        log.info(
            "compress_ratios: %d entries, using the first %d (num_hidden_layers %d + "
            "num_nextn_predict_layers %d); ignoring %s",
            len(ratios),
            want,
            n_layers,
            n_mtp,
            list(ratios[want:]),
        )
    elif len(ratios) < want:
        log.info("compress_ratios: no entry for %d MTP layer(s); they are SWA-only (0)", want - len(ratios))
    return (ratios + (0,) * n_mtp)[:want]


def _schedule(first: list[int], n_layers: int, mtp: int = 1) -> tuple[int, ...]:
    """Leading layers as given, then CSA/HCA alternating (CSA on even indices), then SWA-only MTP."""
    rest = [4 if i % 2 == 0 else 128 for i in range(len(first), n_layers)]
    return tuple(first + rest + [0] * mtp)


FLASH = ModelConfig(compress_ratios=_schedule([0, 0], 43))

PRO = ModelConfig(
    hidden_size=7168,
    num_hidden_layers=61,
    num_attention_heads=128,
    q_lora_rank=1536,
    o_groups=16,
    compress_ratios=_schedule([128, 128], 61),
    index_topk=1024,
    n_routed_experts=384,
    moe_intermediate_size=3072,
    routed_scaling_factor=2.5,
)

# A few million parameters with the same structure: two SWA layers, CSA/HCA alternating, hash-routed
# first layers, mHC with 4 streams, MTP. Real ratios (4/128) and the real 128-token window.
TINY = ModelConfig(
    vocab_size=1024,
    hidden_size=128,
    num_hidden_layers=6,
    num_attention_heads=8,
    head_dim=64,
    qk_rope_head_dim=16,
    q_lora_rank=64,
    o_groups=2,
    o_lora_rank=64,
    compress_ratios=_schedule([0, 0], 6),
    index_n_heads=4,
    index_head_dim=32,
    index_topk=16,
    n_routed_experts=16,
    num_experts_per_tok=2,
    moe_intermediate_size=64,
    num_hash_layers=2,
    max_position_embeddings=65536,
    rope_scaling=RopeScaling(original_max_position_embeddings=4096),
)

# TINY with reduced ratios (CSA 4, HCA 16) and an 8-token window, so tests cross many blocks fast.
TINY_FAST = replace(
    TINY,
    sliding_window=8,
    compress_ratios=tuple(16 if r == 128 else r for r in TINY.compress_ratios),
    index_topk=4,
)

PRESETS: dict[str, ModelConfig] = {
    "deepseek-v4-flash": FLASH,
    "deepseek-v4-pro": PRO,
    "v4-tiny": TINY,
    "v4-tiny-fast": TINY_FAST,
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}") from None
