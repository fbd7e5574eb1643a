"""`v4d checkpoint make MODEL OUT_DIR`: a random-weight checkpoint in the official DeepSeek-V4 format."""

from __future__ import annotations

import click

from v4d.operator.commands.model_info import load_model
from v4d.serving.checkpoint import DEFAULT_SHARD_SIZE, make_checkpoint, parse_size


@click.group("checkpoint")
def command() -> None:
    """Make random-weight checkpoints in the official format."""


@command.command("make")
@click.argument("model")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random initialisation.")
@click.option(
    "--shard-size", default=f"{DEFAULT_SHARD_SIZE >> 30}GiB", show_default=True, help="Largest shard file, e.g. 512MB."
)
def make(model: str, out_dir: str, seed: int, shard_size: str) -> None:
    """Write config.json, FP8/MXFP4 safetensors shards with model.safetensors.index.json, and a
    trained byte-level BPE tokenizer.json for MODEL (a preset or a config.json) into OUT_DIR."""
    cfg = load_model(model)
    try:
        size = parse_size(shard_size)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--shard-size") from None
    try:
        path = make_checkpoint(cfg, out_dir, seed=seed, shard_size=size)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="MODEL") from None
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    click.echo(f"wrote {path}: {len(shards)} shard(s), config.json, tokenizer.json")
