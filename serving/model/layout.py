"""The official DeepSeek-V4 checkpoint layout: every tensor's name, logical shape and stored format.

Names are the official inference code's parameter names (`embed.weight`, `layers.3.attn.wq_a.weight`,
`layers.3.ffn.experts.17.w2.weight`, `mtp.0.e_proj.weight`, ...), which is also how the released
safetensors files name them. A quantised weight `X.weight` has its UE8M0 scales in `X.scale`.
Formats follow the official code and files:

    fp8   float8_e4m3fn [out, in] + X.scale float8_e8m0fnu [ceil(out/128), ceil(in/128)]
    fp4   int8 [out, in/2] (two E2M1 per byte) + X.scale float8_e8m0fnu [out, in/32]
    bf16  norms, embedding, LM head, compressor projections, indexer weights_proj, router
    fp32  mHC parameters, attention sinks, compressor position biases, router bias
    int32 the hash-routing table tid2eid
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from v4d.serving.config import ModelConfig

Fmt = Literal["fp8", "fp4", "bf16", "fp32", "int32"]


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]  # logical (dequantised) shape
    fmt: Fmt


_EXPERT = re.compile(r"^(layers|mtp)\.(\d+)\.ffn\.experts\.(\d+)\.")


def expert_of(name: str, cfg: ModelConfig) -> tuple[int, int] | None:
    """(layer, expert) of a routed-expert tensor name, None for anything else.

    `layer` is the main layer index, or `num_hidden_layers + k` for MTP block k (as in the config's
    compress_ratios), so one number names every MoE layer.
    """
    m = _EXPERT.match(name)
    if m is None:
        return None
    layer = int(m.group(2)) + (cfg.num_hidden_layers if m.group(1) == "mtp" else 0)
    return layer, int(m.group(3))


def _block(cfg: ModelConfig, p: str, layer: int) -> dict[str, TensorSpec]:
    d, hc = cfg.hidden_size, cfg.hc_mult
    heads, hd = cfg.num_attention_heads, cfg.head_dim
    mix = (2 + hc) * hc
    expert = "fp4" if cfg.expert_dtype == "fp4" else "fp8"
    s: dict[str, TensorSpec] = {}
    for site in ("attn", "ffn"):
        s[f"{p}.hc_{site}_fn"] = TensorSpec((mix, hc * d), "fp32")
        s[f"{p}.hc_{site}_base"] = TensorSpec((mix,), "fp32")
        s[f"{p}.hc_{site}_scale"] = TensorSpec((3,), "fp32")
    s[f"{p}.attn_norm.weight"] = TensorSpec((d,), "bf16")
    s[f"{p}.ffn_norm.weight"] = TensorSpec((d,), "bf16")
    a = f"{p}.attn"
    s[f"{a}.attn_sink"] = TensorSpec((heads,), "fp32")
    s[f"{a}.wq_a.weight"] = TensorSpec((cfg.q_lora_rank, d), "fp8")
    s[f"{a}.q_norm.weight"] = TensorSpec((cfg.q_lora_rank,), "bf16")
    s[f"{a}.wq_b.weight"] = TensorSpec((heads * hd, cfg.q_lora_rank), "fp8")
    s[f"{a}.wkv.weight"] = TensorSpec((hd, d), "fp8")
    s[f"{a}.kv_norm.weight"] = TensorSpec((hd,), "bf16")
    # The inference code keeps wo_a in bf16, but the released files store it FP8 (dequantised on load).
    s[f"{a}.wo_a.weight"] = TensorSpec((cfg.o_groups * cfg.o_lora_rank, heads * hd // cfg.o_groups), "fp8")
    s[f"{a}.wo_b.weight"] = TensorSpec((d, cfg.o_groups * cfg.o_lora_rank), "fp8")
    ratio = cfg.compress_ratios[layer]
    if ratio:
        s.update(_compressor(f"{a}.compressor", ratio, hd, d))
        if cfg.layer_kind(layer) == "csa":
            ih, ihd = cfg.index_n_heads, cfg.index_head_dim
            s[f"{a}.indexer.wq_b.weight"] = TensorSpec((ih * ihd, cfg.q_lora_rank), "fp8")
            s[f"{a}.indexer.weights_proj.weight"] = TensorSpec((ih, d), "bf16")
            s.update(_compressor(f"{a}.indexer.compressor", ratio, ihd, d))
    f = f"{p}.ffn"
    s[f"{f}.gate.weight"] = TensorSpec((cfg.n_routed_experts, d), "bf16")
    if cfg.is_hash_layer(layer):
        s[f"{f}.gate.tid2eid"] = TensorSpec((cfg.vocab_size, cfg.num_experts_per_tok), "int32")
    else:
        s[f"{f}.gate.bias"] = TensorSpec((cfg.n_routed_experts,), "fp32")
    inter = cfg.moe_intermediate_size
    for e in range(cfg.n_routed_experts):
        s.update(_ffn(f"{f}.experts.{e}", d, inter, expert))
    s.update(_ffn(f"{f}.shared_experts", d, inter * cfg.n_shared_experts, "fp8"))
    return s


def _compressor(p: str, ratio: int, head_dim: int, d: int) -> dict[str, TensorSpec]:
    width = (2 if ratio == 4 else 1) * head_dim  # the overlapped (ratio 4) compressor has two halves
    return {
        f"{p}.ape": TensorSpec((ratio, width), "fp32"),
        f"{p}.wkv.weight": TensorSpec((width, d), "bf16"),
        f"{p}.wgate.weight": TensorSpec((width, d), "bf16"),
        f"{p}.norm.weight": TensorSpec((head_dim,), "bf16"),
    }


def _ffn(p: str, d: int, inter: int, fmt: Fmt) -> dict[str, TensorSpec]:
    return {
        f"{p}.w1.weight": TensorSpec((inter, d), fmt),
        f"{p}.w2.weight": TensorSpec((d, inter), fmt),
        f"{p}.w3.weight": TensorSpec((inter, d), fmt),
    }


def official_layout(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor of the official checkpoint for `cfg` (scale sidecars implied by fmt), in file order."""
    d, hc = cfg.hidden_size, cfg.hc_mult
    s: dict[str, TensorSpec] = {"embed.weight": TensorSpec((cfg.vocab_size, d), "bf16")}
    for i in range(cfg.num_hidden_layers):
        s.update(_block(cfg, f"layers.{i}", i))
    s["norm.weight"] = TensorSpec((d,), "bf16")
    s["head.weight"] = TensorSpec((cfg.vocab_size, d), "bf16")
    s["hc_head_fn"] = TensorSpec((hc, hc * d), "fp32")
    s["hc_head_base"] = TensorSpec((hc,), "fp32")
    s["hc_head_scale"] = TensorSpec((1,), "fp32")
    for k in range(cfg.num_nextn_predict_layers):
        p = f"mtp.{k}"
        s.update(_block(cfg, p, cfg.num_hidden_layers + k))
        s[f"{p}.e_proj.weight"] = TensorSpec((d, d), "fp8")
        s[f"{p}.h_proj.weight"] = TensorSpec((d, d), "fp8")
        for norm in ("enorm", "hnorm", "norm"):
            s[f"{p}.{norm}.weight"] = TensorSpec((d,), "bf16")
        s[f"{p}.hc_head_fn"] = TensorSpec((hc, hc * d), "fp32")
        s[f"{p}.hc_head_base"] = TensorSpec((hc,), "fp32")
        s[f"{p}.hc_head_scale"] = TensorSpec((1,), "fp32")
    return s


def scale_name(name: str) -> str:
    """`X.weight` -> `X.scale`: where the official files keep a quantised weight's scales."""
    return name.removesuffix(".weight") + ".scale"
