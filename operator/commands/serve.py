"""`v4d serve FILE [--port P]`: validate and plan a manifest, then serve it on an embedded Ray cluster."""

from __future__ import annotations

import sys
from dataclasses import replace

import click

from v4d.serving.precision import PRECISIONS


@click.command("serve")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--port",
    type=int,
    default=None,
    help="HTTP port of the APIs (default: spec.serving.port). "
    "Ray's metrics are exported on the following ports (head, then one per pool).",
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=None,
    help="Weights in the replicas (default: spec.model.precision): deployed keeps FP8/MXFP4, bf16 "
    "or fp32 decode them; auto = deployed on accelerators, fp32 on the CPU.",
)
def command(file: str, port: int | None, precision: str | None) -> None:
    """Serve the V4Deployment in FILE locally until Ctrl-C (SIGINT) or SIGTERM.

    One labelled Ray node per pool stands in for the pool's accelerators; an empty weights URI gets
    a random-weight checkpoint (made once, cached under ~/.cache/v4d/checkpoints/<preset>).
    """
    from v4d.operator.planner import PlanError, plan
    from v4d.operator.validate import SpecError, load_manifest

    try:
        name, spec = load_manifest(file)
        p = plan(spec, name=name)
    except SpecError as e:
        for issue in e.issues:
            click.echo(f"error: {issue}", err=True)
        sys.exit(1)
    except PlanError as e:
        click.echo(f"error: cannot plan {file}: {e}", err=True)
        sys.exit(1)
    if precision is not None:
        p = replace(p, precision=precision)
    for w in p.warnings:
        click.echo(f"warning: {w}", err=True)

    from v4d.serving.local import PortsInUse, serve_forever
    from v4d.serving.plan import WeightsNotHere

    try:
        serve_forever(p, port or p.serving.port, log=lambda s: click.echo(s, err=False))
    except (PortsInUse, WeightsNotHere) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
