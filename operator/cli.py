"""The `v4d` command line.

Subcommands load lazily: `v4d --help`, `v4d validate` and `v4d plan` never import torch or ray,
so they stay fast and work in the operator image. Each subcommand lives in the module named in
COMMANDS as a `click.Command` called `command`.
"""

from __future__ import annotations

import importlib

import click

# name -> (module under v4d.operator.commands, one-line help shown by `v4d --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("validate", "Check a V4Deployment manifest; every error names its field path."),
    "plan": ("plan", "Plan expert placement and KV capacity for a V4Deployment."),
    "model-info": ("model_info", "Parameter counts, weight bytes and KV-cache size of a model."),
    "crd": ("crd", "Print the V4Deployment CustomResourceDefinition generated from the API types."),
    "checkpoint": ("checkpoint", "Make random-weight checkpoints in the official format."),
    "generate": ("generate", "Run a checkpoint in-process and print the generated text."),
    "serve": ("serve", "Serve a V4Deployment locally on an embedded Ray cluster."),
    "operator": ("operator_run", "Run the kopf operator that reconciles V4Deployments."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, _ = COMMANDS[name]
        return importlib.import_module(f"v4d.operator.commands.{module}").command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="v4d")
def main() -> None:
    """v4d: serve DeepSeek-V4-class MoE models on Kubernetes (KubeRay + Ray Serve) or locally."""
