"""`v4d validate FILE`: every problem of a V4Deployment manifest, each with its field path."""

from __future__ import annotations

import sys

import click

from v4d.operator.validate import SpecError, load_manifest


@click.command("validate")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
def command(file: str) -> None:
    """Check FILE against the V4Deployment schema and semantic rules; exit 1 listing every error."""
    try:
        name, _ = load_manifest(file)
    except SpecError as e:
        for issue in e.issues:
            click.echo(f"error: {issue}", err=True)
        click.echo(f"{file}: {len(e.issues)} error(s)", err=True)
        sys.exit(1)
    click.echo(f"{file}: V4Deployment {name!r} is valid")
