"""`v4d operator`: run the kopf operator that reconciles V4Deployments."""

from __future__ import annotations

import click


@click.command("operator")
@click.option(
    "--namespace",
    "-n",
    "namespaces",
    multiple=True,
    help="Watch only this namespace (repeatable; globs like 'team-*' work). Default: all namespaces.",
)
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics on this port (/metrics).")
@click.option("--metrics-addr", default="0.0.0.0", show_default=True, help="Address of the metrics server.")
@click.option("--health-port", type=int, default=None, help="Serve the liveness probe on http://0.0.0.0:PORT/healthz.")
@click.option(
    "--peering",
    default=None,
    help="Peering name for several operator replicas (one is active, the others stand by). "
    "Needs the kopf peering CRDs. Default: standalone.",
)
@click.option("--image-nvidia", default=None, help="Serving image for NVIDIA pools (pools may override).")
@click.option("--image-ascend", default=None, help="Serving image for Ascend pools (pools may override).")
@click.option("--ray-version", default=None, help="rayVersion written into each RayService.")
@click.option(
    "--webhook-port",
    type=int,
    default=None,
    help="Serve the validating admission webhook on this port and register it with the cluster.",
)
@click.option("--webhook-addr", default="0.0.0.0", show_default=True, help="Address the webhook server binds.")
@click.option(
    "--webhook-host",
    default=None,
    help="Host name the apiserver reaches the webhook at (e.g. the webhook Service's DNS name).",
)
@click.option("--webhook-cert", default=None, help="TLS certificate file for the webhook (default: self-signed).")
@click.option("--webhook-key", default=None, help="TLS private key file for the webhook.")
@click.option(
    "--discovery-interval",
    type=float,
    default=None,
    help="Seconds between checks for the Prometheus Operator's PodMonitor API [default: 60].",
)
@click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
def command(
    namespaces: tuple[str, ...],
    metrics_port: int | None,
    metrics_addr: str,
    health_port: int | None,
    peering: str | None,
    image_nvidia: str | None,
    image_ascend: str | None,
    ray_version: str | None,
    webhook_port: int | None,
    webhook_addr: str,
    webhook_host: str | None,
    webhook_cert: str | None,
    webhook_key: str | None,
    discovery_interval: float | None,
    verbose: bool,
) -> None:
    """Reconcile V4Deployments into KubeRay RayServices.

    Uses the current kubeconfig (KUBECONFIG or ~/.kube/config), else the in-cluster service account.
    The same handlers run under `kopf run -m v4d.operator.handlers`.
    """
    import kopf

    from v4d.operator import handlers

    cfg = handlers.OperatorConfig.from_env()
    cfg.metrics_port = metrics_port if metrics_port is not None else cfg.metrics_port
    cfg.metrics_addr = metrics_addr
    if image_nvidia:
        cfg.images["nvidia"] = image_nvidia
    if image_ascend:
        cfg.images["ascend"] = image_ascend
    cfg.ray_version = ray_version or cfg.ray_version
    cfg.webhook_port = webhook_port or cfg.webhook_port
    cfg.webhook_addr = webhook_addr
    cfg.webhook_host = webhook_host or cfg.webhook_host
    cfg.webhook_cert = webhook_cert or cfg.webhook_cert
    cfg.webhook_key = webhook_key or cfg.webhook_key
    cfg.discovery_interval = discovery_interval or cfg.discovery_interval
    handlers.CONFIG = cfg
    if cfg.webhook_port:
        import v4d.operator.webhook  # noqa: F401 - registers the admission handler
    kopf.configure(verbose=verbose)  # one log handler on the root logger: ours log through it too
    kopf.run(
        clusterwide=not namespaces,
        namespaces=list(namespaces),
        standalone=peering is None,
        peering_name=peering,
        liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz" if health_port else None,
    )
