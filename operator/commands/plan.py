"""`v4d plan FILE`: expert placement and KV capacity of a V4Deployment, as a table or JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from v4d.operator.planner import PlanError, plan, transport_assumption
from v4d.operator.validate import SpecError, load_manifest
from v4d.serving.plan import Plan
from v4d.serving.sizing import human_bytes


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def render_text(p: Plan) -> str:
    e = p.engine
    lines = [
        f"V4Deployment {p.name}: model {p.model}, served as {p.served_name!r}, weights {p.weights_uri or '(random)'}",
        "",
        _table(
            [["POOL", "VENDOR", "RESOURCE", "NODES", "DEVICES", "MEMORY", "ROLES"]]
            + [
                [
                    q.name,
                    q.vendor,
                    q.resource_name,
                    str(q.nodes),
                    str(q.devices),
                    f"{q.device_memory_gib:g} GiB",
                    ",".join(q.roles),
                ]
                for q in p.pools
            ]
        ),
        "",
        f"Attention engine on `{e.pool}`: {e.replicas} replica(s) (min {e.min_replicas}, max {e.max_replicas}) "
        f"x {e.devices_per_replica} device(s)",
        f"  KV budget {human_bytes(e.kv_budget_bytes)} per replica: {e.num_pages:,} pages x {e.page_tokens} = "
        f"{e.capacity_tokens:,} tokens at {p.kv.bytes_per_token:,.1f} B/token, {e.max_num_seqs} sequences; "
        f"max context {p.max_context_tokens:,}",
        f"Experts: {p.experts.logical} logical + {p.experts.redundant} redundant = "
        f"{p.experts.physical} slots per layer "
        f"on {len(p.shards)} shard(s); balance max/mean {p.balance.max_over_mean:.3f}",
        f"Transport: {p.transport.per_token_us:,.1f} us per token, {p.transport.cross_vendor_share:.0%} of "
        f"token-expert pairs cross vendors ({p.transport.cross_vendor_step_ms:,.2f} ms per decode step at "
        f"{e.max_num_seqs} sequences); assumed {transport_assumption(p.transport)}",
        "",
        _table(
            [["SHARD", "POOL", "DEVICE", "SLOTS/LAYER", "WEIGHTS"]]
            + [[s.name, s.pool, str(s.device), str(len(s.slots[0])), human_bytes(s.weight_bytes)] for s in p.shards]
        ),
    ]
    if p.warnings:
        lines += ["", "Warnings:"] + [f"  - {w}" for w in p.warnings]
    return "\n".join(lines)


@click.command("plan")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the full plan as JSON.")
@click.option(
    "--expert-load",
    type=click.Path(exists=True, dir_okay=False),
    help="JSON [moe_layer][expert] expected token loads (e.g. observed counts); uniform if omitted.",
)
def command(file: str, as_json: bool, expert_load: str | None) -> None:
    """Plan devices, expert slots (EPLB) and KV capacity for the V4Deployment in FILE."""
    try:
        name, spec = load_manifest(file)
        load = json.loads(Path(expert_load).read_text()) if expert_load else None
        result = plan(spec, expert_load=load, name=name)
    except (SpecError, PlanError) as e:
        for problem in getattr(e, "issues", None) or e.problems:
            click.echo(f"error: {problem}", err=True)
        sys.exit(1)
    click.echo(result.to_json(indent=2) if as_json else render_text(result))
