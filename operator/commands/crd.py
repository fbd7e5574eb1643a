"""`v4d crd`: print the V4Deployment CustomResourceDefinition generated from the API types."""

from __future__ import annotations

import click

from v4d.operator import crd as crd_mod


@click.command("crd")
@click.option(
    "--write",
    is_flag=True,
    help="Also rewrite the committed copies: manifests/, charts/ and the README's field reference.",
)
@click.option("--markdown", is_flag=True, help="Print the field reference (markdown tables) instead of the CRD.")
def command(write: bool, markdown: bool) -> None:
    """Print the V4Deployment CustomResourceDefinition (apiextensions.k8s.io/v1) as YAML."""
    click.echo(crd_mod.reference_markdown() if markdown else crd_mod.render_yaml(), nl=False)
    if write:
        for path in crd_mod.write_files():
            click.echo(f"wrote {path}", err=True)
