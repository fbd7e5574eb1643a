"""The official DeepSeek-V4 checkpoint layout: every tensor's file name, logical shape and format.

Built from the size-math inventory (`v4d.serving.sizing.model_tensors`, the tensors of the
official inference `model.py` with their released storage formats), expanded to one entry per
routed expert and with the MTP blocks under their file prefix `mtp.{k}.` instead of
`layers.{num_hidden_layers + k}.`. Names are the official inference code's parameter names, which
are also the released safetensors names and the model's state_dict names; a quantised weight
`X.weight` keeps its UE8M0 scales in `X.scale`:

    fp8   float8_e4m3fn [out, in] + X.scale float8_e8m0fnu [ceil(out/128), ceil(in/128)]
    fp4   int8 [out, in/2] (two E2M1 per byte, even column low) + X.scale float8_e8m0fnu [out, in/32]
    bf16  norms, embedding, LM head, compressor projections, indexer weights_proj, router
    fp32  mHC parameters, attention sinks, compressor position biases, router bias
    int32 the hash-routing table tid2eid
"""

from __future__ import annotations

import re

from v4d.serving.config import ModelConfig
from v4d.serving.sizing import Tensor, model_tensors

_EXPERT = re.compile(r"^(layers|mtp)\.(\d+)\.ffn\.experts\.(\d+)\.")


def official_layout(cfg: ModelConfig) -> dict[str, Tensor]:
    """Every tensor of the official checkpoint for `cfg` (with MTP), by file name, in inventory order."""
    L = cfg.num_hidden_layers
    out: dict[str, Tensor] = {}
    for t in model_tensors(cfg, mtp=True):
        name = t.name
        m = re.match(r"layers\.(\d+)\.", name)
        if m and int(m.group(1)) >= L:
            name = f"mtp.{int(m.group(1)) - L}.{name[m.end() :]}"
        names = [name.replace(".*.", f".{e}.") for e in range(t.copies)] if ".*." in name else [name]
        if len(names) != t.copies:
            raise AssertionError(f"{t.name}: {t.copies} copies of a tensor without an expert index")
        for n in names:
            out[n] = Tensor(n, t.shape, t.storage, t.part)
    return out


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


def scale_name(name: str) -> str:
    """`X.weight` -> `X.scale`: where the official files keep a quantised weight's scales."""
    return name.removesuffix(".weight") + ".scale"


# Renames the official converter (`inference/convert.py`) applies to Hugging Face style names, so a
# checkpoint saved as `model.layers.0.self_attn.q_a_proj.weight` + `...weight_scale_inv` maps onto
# the same inference names as the released `layers.0.attn.wq_a.weight` + `...scale`.
_HF_PARTS = {
    "embed_tokens": "embed",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "q_a_proj": "wq_a",
    "q_a_layernorm": "q_norm",
    "q_b_proj": "wq_b",
    "self_attn": "attn",
    "mlp": "ffn",
    "gate_proj": "w1",
    "down_proj": "w2",
    "up_proj": "w3",
    "lm_head": "head",
    "weight_scale_inv": "scale",
    "e_score_correction_bias": "bias",
}


def inference_name(file_key: str) -> str | None:
    """The inference (= model state_dict) name of a tensor in a checkpoint file, as the official
    converter derives it; None for the MTP block's copies of the shared embedding and head, which
    the converter drops too. Released names map to themselves."""
    name = file_key.removeprefix("model.")
    if name.startswith("mtp.") and ("emb" in name or name.endswith("head.weight")):
        return None
    return ".".join(_HF_PARTS.get(part, part) for part in name.split("."))
