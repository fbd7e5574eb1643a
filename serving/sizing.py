"""Model size math from the config alone: parameters, weight bytes, KV-cache bytes (torch-free).

Everything derives from one tensor inventory (`model_tensors`) that lists every tensor the official
inference `model.py` creates (docs/deepseek-v4.md [S2]), with the storage format the released checkpoint
uses for it. Conventions (they reproduce the sheet, docs/deepseek-v4.md §1.2 and §3):

- Parameters: every tensor except the hash layers' `tid2eid` token->expert lookup table (int32,
  not trained). Counted this way Flash is 290,942,289,362 and Pro 1,598,837,347,742 with MTP, which
  is the checkpoint audit of §1.2 to the unit.
- "Total" excludes the MTP block (Flash 284.3B, Pro 1.573T); "with MTP" includes it (290.9B /
  1,598.8B). The MTP block shares the embedding and LM head, so it adds only its own tensors.
- Activated: every main-model tensor except the embedding table, with routed experts counted
  `num_experts_per_tok` of `n_routed_experts` (the router, shared expert, mHC and head always run).
- Deployed bytes: FP8 E4M3 with one UE8M0 byte per 128x128 block for every matrix the checkpoint
  keeps in FP8 (including `wo_a`, which the reference merely computes in BF16); MXFP4 routed experts
  (0.5 B/param + one UE8M0 byte per 32 along K); BF16 for the embedding, LM head, router, indexer
  `weights_proj`, compressor maps and RMSNorm gains; FP32 for the attention sink, compressor
  positional bias, router bias and every mHC tensor. "bf16" stores every FP8/FP4 matrix in BF16
  and leaves the rest as deployed.
- KV: a main entry (window or compressed) is 584 B deployed (448 FP8 + 64 BF16 RoPE dims + 7 UE8M0
  scales + 1 pad), an indexer key 68 B (FP4 + UE8M0 per 32); BF16 is 2 B per dim. The
  whole-sequence cache at N tokens counts every compressed entry plus the 128-entry window of each
  main layer (§3.2: Pro 4.92 GiB at 1,048,576 tokens). The per-request state (§3.4) is the window
  ring plus the compressors' not-yet-closed tails, which the reference keeps in fp32 (value and
  gate, `kv_state`/`score_state`). The MTP layer is not served, so it holds no cache here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from math import ceil, lcm, prod
from typing import Any, Literal

from v4d.serving.config import LayerKind, ModelConfig

Fmt = Literal["deployed", "bf16"]
KvFmt = Literal["deployed", "bf16", "fp32"]  # KV storage; fp32 is the engine's exactness-test format
Storage = Literal["fp8", "fp4", "bf16", "fp32", "int32"]
FORMATS: tuple[Fmt, ...] = ("deployed", "bf16")

FP8_BLOCK = 128  # weight scale block (128 x 128), one UE8M0 byte each
FP4_BLOCK = 32  # MXFP4: one UE8M0 byte per 32 elements along K
KV_SCALE_GROUP = 64  # FP8 KV: one UE8M0 scale per 64 non-RoPE values

# Baselines of §3.1: V3.2 charged its deployed FP8 format (656 B MLA + 132 B FP8 indexer per token per
# layer; 1024+64 dims x 2 B + 128 x 2 B in BF16) over its 61 layers; GQA-8 at head dim 128 in BF16 (K and V)
# over the same number of layers as the model.
V32_LAYERS = 61
V32_BYTES_PER_TOKEN_LAYER: dict[Fmt, int] = {"deployed": 656 + 132, "bf16": 1152 + 256}
GQA8_BYTES_PER_TOKEN_LAYER = 2 * 8 * 128 * 2


@dataclass(frozen=True)
class Tensor:
    """One tensor of the official model (or `copies` identical ones, e.g. a layer's routed experts)."""

    name: str
    shape: tuple[int, ...]
    storage: Storage
    part: str  # embed | head | attn | router | routed | shared | norm | mhc | mtp
    copies: int = 1
    is_param: bool = True

    @property
    def numel(self) -> int:
        return prod(self.shape) * self.copies

    def nbytes(self, fmt: Fmt = "deployed") -> int:
        n = prod(self.shape)
        if self.storage in ("fp8", "fp4") and fmt == "bf16":
            per = 2 * n
        elif self.storage == "fp8":
            out_f, in_f = self.shape
            per = n + ceil(out_f / FP8_BLOCK) * ceil(in_f / FP8_BLOCK)
        elif self.storage == "fp4":
            out_f, in_f = self.shape
            per = n // 2 + out_f * ceil(in_f / FP4_BLOCK)
        else:
            per = n * {"bf16": 2, "fp32": 4, "int32": 4}[self.storage]
        return per * self.copies


def _compressor(cfg: ModelConfig, prefix: str, ratio: int, dim: int) -> list[Tensor]:
    """Gated-pooling compressor: the overlapped CSA one (ratio 4) has two branches, so 2x width."""
    width = (2 if ratio == 4 else 1) * dim
    d = cfg.hidden_size
    return [
        Tensor(f"{prefix}.ape", (ratio, width), "fp32", "attn"),
        Tensor(f"{prefix}.wkv.weight", (width, d), "bf16", "attn"),
        Tensor(f"{prefix}.wgate.weight", (width, d), "bf16", "attn"),
        Tensor(f"{prefix}.norm.weight", (dim,), "bf16", "norm"),
    ]


def block_tensors(cfg: ModelConfig, layer: int) -> list[Tensor]:
    """Tensors of block `layer` (main layers 0..L-1, MTP layers L..): attention, MoE, norms, mHC."""
    d, hd, nh, g = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.o_groups
    ql, E, inter = cfg.q_lora_rank, cfg.n_routed_experts, cfg.moe_intermediate_size
    p = f"layers.{layer}"
    ratio = cfg.compress_ratios[layer]
    ts = [
        Tensor(f"{p}.attn.attn_sink", (nh,), "fp32", "attn"),
        Tensor(f"{p}.attn.wq_a.weight", (ql, d), "fp8", "attn"),
        Tensor(f"{p}.attn.q_norm.weight", (ql,), "bf16", "norm"),
        Tensor(f"{p}.attn.wq_b.weight", (nh * hd, ql), "fp8", "attn"),
        Tensor(f"{p}.attn.wkv.weight", (hd, d), "fp8", "attn"),
        Tensor(f"{p}.attn.kv_norm.weight", (hd,), "bf16", "norm"),
        Tensor(f"{p}.attn.wo_a.weight", (g * cfg.o_lora_rank, nh * hd // g), "fp8", "attn"),
        Tensor(f"{p}.attn.wo_b.weight", (d, g * cfg.o_lora_rank), "fp8", "attn"),
    ]
    if ratio:
        ts += _compressor(cfg, f"{p}.attn.compressor", ratio, hd)
    if ratio == 4:
        ih, ihd = cfg.index_n_heads, cfg.index_head_dim
        ts += [
            Tensor(f"{p}.attn.indexer.wq_b.weight", (ih * ihd, ql), "fp8", "attn"),
            Tensor(f"{p}.attn.indexer.weights_proj.weight", (ih, d), "bf16", "attn"),
            *_compressor(cfg, f"{p}.attn.indexer.compressor", ratio, ihd),
        ]
    ts.append(Tensor(f"{p}.ffn.gate.weight", (E, d), "bf16", "router"))
    if cfg.is_hash_layer(layer):
        ts.append(
            Tensor(
                f"{p}.ffn.gate.tid2eid",
                (cfg.vocab_size, cfg.num_experts_per_tok),
                "int32",
                "router",
                is_param=False,
            )
        )
    else:
        ts.append(Tensor(f"{p}.ffn.gate.bias", (E,), "fp32", "router"))
    expert_fmt: Storage = "fp4" if cfg.expert_dtype == "fp4" else "fp8"
    for w, shape in (("w1", (inter, d)), ("w2", (d, inter)), ("w3", (inter, d))):
        ts.append(Tensor(f"{p}.ffn.experts.*.{w}.weight", shape, expert_fmt, "routed", copies=E))
        ts.append(Tensor(f"{p}.ffn.shared_experts.{w}.weight", shape, "fp8", "shared", copies=cfg.n_shared_experts))
    mix, hc_dim = (2 + cfg.hc_mult) * cfg.hc_mult, cfg.hc_mult * d
    ts += [Tensor(f"{p}.{n}_norm.weight", (d,), "bf16", "norm") for n in ("attn", "ffn")]
    for site in ("attn", "ffn"):
        ts += [
            Tensor(f"{p}.hc_{site}_fn", (mix, hc_dim), "fp32", "mhc"),
            Tensor(f"{p}.hc_{site}_base", (mix,), "fp32", "mhc"),
            Tensor(f"{p}.hc_{site}_scale", (3,), "fp32", "mhc"),
        ]
    return ts


def _hc_head(cfg: ModelConfig, prefix: str) -> list[Tensor]:
    hc = cfg.hc_mult
    return [
        Tensor(f"{prefix}hc_head_fn", (hc, hc * cfg.hidden_size), "fp32", "mhc"),
        Tensor(f"{prefix}hc_head_base", (hc,), "fp32", "mhc"),
        Tensor(f"{prefix}hc_head_scale", (1,), "fp32", "mhc"),
    ]


@lru_cache(maxsize=32)
def model_tensors(cfg: ModelConfig, mtp: bool = False) -> tuple[Tensor, ...]:
    """Every tensor of the model; with `mtp`, also the MTP blocks (they share embedding and head)."""
    V, d = cfg.vocab_size, cfg.hidden_size
    ts = [Tensor("embed.weight", (V, d), "bf16", "embed")]
    for i in range(cfg.num_hidden_layers):
        ts += block_tensors(cfg, i)
    ts += [Tensor("norm.weight", (d,), "bf16", "norm"), Tensor("head.weight", (V, d), "bf16", "head")]
    ts += _hc_head(cfg, "")
    if mtp:
        for k in range(cfg.num_nextn_predict_layers):
            i = cfg.num_hidden_layers + k
            p = f"mtp.{k}."
            ts += block_tensors(cfg, i)
            ts += [
                Tensor(f"{p}e_proj.weight", (d, d), "fp8", "mtp"),
                Tensor(f"{p}h_proj.weight", (d, d), "fp8", "mtp"),
                *(Tensor(f"{p}{n}.weight", (d,), "bf16", "norm") for n in ("enorm", "hnorm", "norm")),
                *_hc_head(cfg, p),
            ]
    return tuple(ts)


# -- parameters -------------------------------------------------------------------------------
def params_total(cfg: ModelConfig, mtp: bool = False) -> int:
    return sum(t.numel for t in model_tensors(cfg, mtp) if t.is_param)


def params_active(cfg: ModelConfig) -> int:
    """Parameters one token touches: routed experts k of E, the embedding table not counted (§1.2)."""
    total = 0
    for t in model_tensors(cfg):
        if not t.is_param or t.part == "embed":
            continue
        if t.part == "routed":
            total += t.numel // t.copies * cfg.num_experts_per_tok
        else:
            total += t.numel
    return total


# -- weight bytes -----------------------------------------------------------------------------
def weight_bytes(cfg: ModelConfig, fmt: Fmt = "deployed", mtp: bool = False) -> int:
    return sum(t.nbytes(fmt) for t in model_tensors(cfg, mtp))


def expert_bytes(cfg: ModelConfig, fmt: Fmt = "deployed") -> int:
    """One routed expert of one MoE layer (w1, w2, w3 with their scales)."""
    layer = cfg.num_hidden_layers - 1
    return sum(t.nbytes(fmt) // t.copies for t in block_tensors(cfg, layer) if t.part == "routed")


def dense_bytes(cfg: ModelConfig, fmt: Fmt = "deployed") -> int:
    """Everything an attention replica holds: the main model without its routed experts."""
    return sum(t.nbytes(fmt) for t in model_tensors(cfg) if t.part != "routed")


# -- KV cache ---------------------------------------------------------------------------------
def main_entry_bytes(cfg: ModelConfig, fmt: KvFmt = "deployed") -> int:
    """One 512-d key=value entry: FP8 non-RoPE dims + BF16 RoPE dims + UE8M0 scales, padded to 8 B."""
    if fmt != "deployed":
        return (2 if fmt == "bf16" else 4) * cfg.head_dim
    nope, rope = cfg.nope_head_dim, cfg.qk_rope_head_dim
    scales = ceil(ceil(nope / KV_SCALE_GROUP) / 8) * 8  # 7 scales + 1 pad -> 8 B for V4
    return nope + 2 * rope + scales


def indexer_entry_bytes(cfg: ModelConfig, fmt: KvFmt = "deployed") -> int:
    """One indexer key: FP4 (E2M1) values + one UE8M0 per 32 (68 B for 128 dims), or BF16 / fp32."""
    if fmt != "deployed":
        return (2 if fmt == "bf16" else 4) * cfg.index_head_dim
    return cfg.index_head_dim // 2 + ceil(cfg.index_head_dim / FP4_BLOCK)


def kv_bytes_per_token_by_kind(cfg: ModelConfig, fmt: Fmt = "deployed") -> dict[LayerKind, float]:
    """Amortised compressed-cache bytes per token for ONE layer of each kind (window excluded)."""
    main, idx = main_entry_bytes(cfg, fmt), indexer_entry_bytes(cfg, fmt)
    out: dict[LayerKind, float] = {"swa": 0.0, "csa": 0.0, "hca": 0.0}
    for i, kind in enumerate(cfg.main_layer_kinds):
        r = cfg.compress_ratios[i]
        if kind != "swa":
            out[kind] = (main + (idx if kind == "csa" else 0)) / r
    return out


def kv_bytes_per_token(cfg: ModelConfig, fmt: Fmt = "deployed") -> float:
    """Compressed-cache bytes per token over all main layers, at long context (window excluded)."""
    main, idx = main_entry_bytes(cfg, fmt), indexer_entry_bytes(cfg, fmt)
    total = 0.0
    for i, kind in enumerate(cfg.main_layer_kinds):
        if kind != "swa":
            total += (main + (idx if kind == "csa" else 0)) / cfg.compress_ratios[i]
    return total


def kv_bytes_at_context(cfg: ModelConfig, n_tokens: int, fmt: Fmt = "deployed") -> int:
    """Whole-sequence cache at `n_tokens`: every closed compressed entry plus each layer's window (§3.2)."""
    main, idx = main_entry_bytes(cfg, fmt), indexer_entry_bytes(cfg, fmt)
    total = 0
    for i, kind in enumerate(cfg.main_layer_kinds):
        total += min(n_tokens, cfg.sliding_window) * main
        if kind != "swa":
            total += (n_tokens // cfg.compress_ratios[i]) * (main + (idx if kind == "csa" else 0))
    return total


def compressor_state_bytes(cfg: ModelConfig, layer: int) -> int:
    """fp32 value + gate tails one request keeps in `layer` until a block closes ([S2] kv/score_state).

    CSA keeps the previous block too (overlap): 2r positions x 2 branches, for the main compressor and
    the indexer's; HCA keeps r positions x 1 branch.
    """
    r, kind = cfg.compress_ratios[layer], cfg.layer_kind(layer)
    if kind == "csa":
        return 2 * 4 * (2 * r) * (2 * cfg.head_dim + 2 * cfg.index_head_dim)
    if kind == "hca":
        return 2 * 4 * r * cfg.head_dim
    return 0


def layer_slot_bytes(cfg: ModelConfig, layer: int, fmt: KvFmt = "deployed") -> int:
    """Per-request state of one layer (main or MTP): its window ring + fp32 compressor tails."""
    return cfg.sliding_window * main_entry_bytes(cfg, fmt) + compressor_state_bytes(cfg, layer)


# -- paged layout (the engine's unit of allocation) -------------------------------------------
def page_tokens(cfg: ModelConfig) -> int:
    """Token positions per KV page: 128, or a multiple of every compression ratio if larger."""
    return lcm(128, *(r for r in cfg.compress_ratios if r))


def layer_page_bytes(cfg: ModelConfig, layer: int, fmt: KvFmt = "deployed") -> int:
    """One page of one layer (main or MTP): page_tokens / ratio main entries, as many indexer keys on CSA."""
    r = cfg.compress_ratios[layer]
    if not r:
        return 0
    idx = indexer_entry_bytes(cfg, fmt) if cfg.layer_kind(layer) == "csa" else 0
    return page_tokens(cfg) // r * (main_entry_bytes(cfg, fmt) + idx)


def cached_layers(cfg: ModelConfig, with_mtp: bool = False) -> range:
    """Layers holding KV state: every main layer, plus the MTP layers when they run (speculation)."""
    return range(cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if with_mtp else 0))


def page_bytes(cfg: ModelConfig, fmt: KvFmt = "deployed", with_mtp: bool = False) -> int:
    """One page across the cached layers (Pro deployed, main layers: 30 x 32 x (584+68) + 31 x 584 = 644,024 B)."""
    return sum(layer_page_bytes(cfg, i, fmt) for i in cached_layers(cfg, with_mtp))


def slot_bytes(cfg: ModelConfig, fmt: KvFmt = "deployed", with_mtp: bool = False) -> int:
    """One request's fixed state (§3.4): the window ring of every cached layer + fp32 compressor tails."""
    return sum(layer_slot_bytes(cfg, i, fmt) for i in cached_layers(cfg, with_mtp))


def pages_for(cfg: ModelConfig, n_tokens: int) -> int:
    return ceil(n_tokens / page_tokens(cfg))


# -- the `v4d model-info` report ----------------------------------------------------------------
def model_info(cfg: ModelConfig, context_tokens: int | None = None) -> dict[str, Any]:
    """Every figure `v4d model-info --json` prints; keys are part of the CLI contract."""
    n = context_tokens or cfg.max_position_embeddings
    L = cfg.num_hidden_layers
    kv_at = {f: kv_bytes_at_context(cfg, n, f) for f in FORMATS}
    v32 = {f: V32_LAYERS * V32_BYTES_PER_TOKEN_LAYER[f] * n for f in FORMATS}
    gqa8 = L * GQA8_BYTES_PER_TOKEN_LAYER * n
    kinds = cfg.main_layer_kinds
    return {
        "params_total": params_total(cfg),
        "params_total_with_mtp": params_total(cfg, mtp=True),
        "params_active": params_active(cfg),
        "weight_bytes": {f: weight_bytes(cfg, f) for f in FORMATS},
        "weight_bytes_with_mtp": {f: weight_bytes(cfg, f, mtp=True) for f in FORMATS},
        "expert_bytes": {f: expert_bytes(cfg, f) for f in FORMATS},
        "dense_bytes": {f: dense_bytes(cfg, f) for f in FORMATS},
        "layers": {k: kinds.count(k) for k in ("swa", "csa", "hca")},
        "kv_entry_bytes": {
            f: {"main": main_entry_bytes(cfg, f), "indexer": indexer_entry_bytes(cfg, f)} for f in FORMATS
        },
        "kv_bytes_per_token_by_kind": {f: kv_bytes_per_token_by_kind(cfg, f) for f in FORMATS},
        "kv_bytes_per_token": {f: kv_bytes_per_token(cfg, f) for f in FORMATS},
        "context_tokens": n,
        "kv_bytes_at_context": kv_at,
        "per_request_state_bytes": {f: slot_bytes(cfg, f) for f in FORMATS},
        "page": {"tokens": page_tokens(cfg), **{f"bytes_{f}": page_bytes(cfg, f) for f in FORMATS}},
        "kv_bytes_at_context_v32": v32,
        "kv_bytes_at_context_gqa8": gqa8,
        "kv_ratio_vs_v32": {f: kv_at[f] / v32[f] for f in FORMATS},
        "kv_ratio_vs_gqa8": {f: kv_at[f] / gqa8 for f in FORMATS},
    }


def human_bytes(n: float) -> str:
    """1.5 GiB, 12.00 MiB, 584 B: binary units, for messages and tables."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"
