"""`v4d model-info MODEL`: parameters, weight bytes and KV-cache size computed from the config alone."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from v4d.serving.config import PRESETS, ModelConfig
from v4d.serving.sizing import human_bytes, model_info


def load_model(model: str) -> ModelConfig:
    """A preset name or the path of an HF-style config.json."""
    if model in PRESETS:
        return PRESETS[model]
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise click.BadParameter(
            f"not a preset ({', '.join(PRESETS)}) nor a config.json: {model!r}", param_hint="MODEL"
        )
    try:
        return ModelConfig.from_json(path)
    except (ValueError, TypeError) as e:
        raise click.BadParameter(f"{path}: {e}", param_hint="MODEL") from None


def render_text(name: str, info: dict) -> str:
    kv, layers = info["kv_bytes_per_token_by_kind"], info["layers"]
    n = info["context_tokens"]
    rows = [
        (
            "parameters",
            f"{info['params_total'] / 1e9:,.1f}B ({info['params_total_with_mtp'] / 1e9:,.1f}B with MTP), "
            f"{info['params_active'] / 1e9:,.1f}B activated per token",
        ),
        (
            "weights",
            f"{human_bytes(info['weight_bytes']['deployed'])} deployed (FP8 + FP4 experts), "
            f"{human_bytes(info['weight_bytes']['bf16'])} BF16",
        ),
        (
            "  with MTP",
            f"{info['weight_bytes_with_mtp']['deployed'] / 1e9:,.1f} GB deployed (the checkpoint)",
        ),
        ("  routed expert", f"{human_bytes(info['expert_bytes']['deployed'])} each, per layer"),
        ("  dense part", f"{human_bytes(info['dense_bytes']['deployed'])} (attention replica)"),
        ("layers", f"{layers['swa']} SWA-only, {layers['csa']} CSA, {layers['hca']} HCA"),
        (
            "KV per token",
            f"{info['kv_bytes_per_token']['deployed']:,.1f} B deployed, "
            f"{info['kv_bytes_per_token']['bf16']:,.1f} B BF16 "
            f"(per layer: CSA {kv['deployed']['csa']:g} B, HCA {kv['deployed']['hca']:g} B)",
        ),
        (
            f"KV at {n:,} tokens",
            f"{human_bytes(info['kv_bytes_at_context']['deployed'])} deployed, "
            f"{human_bytes(info['kv_bytes_at_context']['bf16'])} BF16",
        ),
        (
            "  vs V3.2",
            f"{info['kv_ratio_vs_v32']['deployed']:.1%} ({info['kv_ratio_vs_v32']['bf16']:.1%} BF16 vs BF16)",
        ),
        ("  vs GQA-8", f"{info['kv_ratio_vs_gqa8']['deployed']:.1%}"),
        (
            "per-request state",
            f"{human_bytes(info['per_request_state_bytes']['deployed'])} (window + compressor tails)",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join([name] + [f"  {k.ljust(width)}  {v}" for k, v in rows])


@click.command("model-info")
@click.argument("model")
@click.option(
    "--context",
    type=click.IntRange(min=1),
    default=None,
    help="Sequence length for the whole-sequence KV figures (default: max_position_embeddings).",
)
@click.option("--json", "as_json", is_flag=True, help="Print every figure as JSON.")
def command(model: str, context: int | None, as_json: bool) -> None:
    """Sizes of MODEL (a preset name or a config.json path), computed from its config without allocating."""
    cfg = load_model(model)
    info = model_info(cfg, context)
    if as_json:
        json.dump(info, sys.stdout, indent=2)
        click.echo()
    else:
        click.echo(render_text(model, info))
