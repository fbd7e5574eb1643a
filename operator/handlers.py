"""kopf handlers (thin): every trigger ends in `Reconciler.sync` of one V4Deployment.

Run with `v4d operator` or `kopf run -m v4d.operator.handlers [-A | -n NS] [--standalone]`.
Without the CLI, settings come from the environment: V4D_OPERATOR_METRICS_PORT,
V4D_IMAGE_NVIDIA, V4D_IMAGE_ASCEND, V4D_RAY_VERSION, V4D_WEBHOOK_PORT / V4D_WEBHOOK_HOST /
V4D_WEBHOOK_CERT / V4D_WEBHOOK_KEY, V4D_DISCOVERY_INTERVAL. The kubeconfig is read at startup (KUBECONFIG, else
~/.kube/config, else the in-cluster account), not at import, so KUBECONFIG set late still counts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from v4d.operator import render
from v4d.operator.kube import Kube
from v4d.operator.metrics import OperatorMetrics, start_metrics_server
from v4d.operator.reconcile import Reconciler, api_message
from v4d.serving.names import DEPLOYMENT_LABEL, GROUP, MANAGED_BY, PLURAL, VERSION

OWNED = {"app.kubernetes.io/managed-by": MANAGED_BY}
BACKOFF_S = 2  # first retry of a failed reconcile; doubled per retry up to MAX_BACKOFF_S
MAX_BACKOFF_S = 120
COALESCE_S = 0.2  # child events within this window trigger one reconcile of their owner
MONITORING_API = ("monitoring.coreos.com/v1", "PodMonitor")
log = logging.getLogger("v4d.operator")


@dataclass
class OperatorConfig:
    metrics_port: int | None = None
    metrics_addr: str = "0.0.0.0"
    images: dict[str, str] = field(default_factory=lambda: dict(render.RenderOptions().images))
    ray_version: str = render.RenderOptions().ray_version
    webhook_port: int | None = None
    webhook_addr: str = "0.0.0.0"
    webhook_host: str | None = None
    webhook_cert: str | None = None
    webhook_key: str | None = None
    max_workers: int = 8
    discovery_interval: float = 60.0  # seconds between checks for the Prometheus Operator's API

    @classmethod
    def from_env(cls) -> OperatorConfig:
        env = os.environ
        c = cls()
        if env.get("V4D_OPERATOR_METRICS_PORT"):
            c.metrics_port = int(env["V4D_OPERATOR_METRICS_PORT"])
        for vendor in c.images:
            c.images[vendor] = env.get(f"V4D_IMAGE_{vendor.upper()}", c.images[vendor])
        c.ray_version = env.get("V4D_RAY_VERSION", c.ray_version)
        if env.get("V4D_WEBHOOK_PORT"):
            c.webhook_port = int(env["V4D_WEBHOOK_PORT"])
        c.webhook_host = env.get("V4D_WEBHOOK_HOST") or None
        c.webhook_cert = env.get("V4D_WEBHOOK_CERT") or None
        c.webhook_key = env.get("V4D_WEBHOOK_KEY") or None
        if env.get("V4D_DISCOVERY_INTERVAL"):
            c.discovery_interval = float(env["V4D_DISCOVERY_INTERVAL"])
        return c


CONFIG: OperatorConfig | None = None  # set by `v4d operator` before kopf starts; else from env


@dataclass
class _State:
    reconciler: Reconciler | None = None
    metrics: OperatorMetrics | None = None
    server: Any = None
    pending: set[tuple[str, str]] = field(default_factory=set)
    failures: dict[tuple[str, str], str] = field(default_factory=dict)  # last failure Event per object
    known: set[tuple[str, str]] = field(default_factory=set)  # V4Deployments seen, to resync all at once
    discovery: asyncio.Task | None = None


STATE = _State()


def _configuration() -> client.Configuration:
    """The current kubeconfig (KUBECONFIG as set now, else ~/.kube/config), else the in-cluster account.
    (kopf's own login helper reads the kubeconfig path fixed when `kubernetes` was imported.)"""
    cfg = client.Configuration()
    try:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None, client_configuration=cfg)
    except config.ConfigException:
        config.load_incluster_config(client_configuration=cfg)
    return cfg


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    cfg = _configuration()
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        username=cfg.username or None,
        password=cfg.password or None,
        scheme=scheme or None,
        token=token or None,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
    )


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    cfg = CONFIG or OperatorConfig.from_env()
    # kopf's bookkeeping goes to annotations (the status schema would prune status.kopf) and its
    # own per-handler Events are off: the reconciler posts the Events that say what changed.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="v4d.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="v4d.dev")
    settings.posting.enabled = False
    settings.execution.max_workers = cfg.max_workers
    if cfg.webhook_port:
        settings.admission.server = kopf.WebhookServer(
            addr=cfg.webhook_addr,
            port=cfg.webhook_port,
            host=cfg.webhook_host,
            certfile=cfg.webhook_cert,
            pkeyfile=cfg.webhook_key,
        )
        settings.admission.managed = f"{PLURAL}.{GROUP}"
    metrics = OperatorMetrics()
    api_config = _configuration()
    api_config.connection_pool_maxsize = cfg.max_workers * 2  # one connection per reconcile thread
    kube = Kube(client.ApiClient(api_config), on_write=metrics.api_write)
    options = render.RenderOptions(
        images=cfg.images, ray_version=cfg.ray_version, monitoring=kube.has_api(*MONITORING_API)
    )
    STATE.metrics = metrics
    STATE.reconciler = Reconciler(kube=kube, metrics=metrics, options=options)
    if cfg.metrics_port is not None:
        STATE.server = start_metrics_server(metrics, cfg.metrics_port, cfg.metrics_addr)
    log.info("v4d operator ready (PodMonitors: %s)", options.monitoring)


@kopf.on.startup()
async def start_discovery(**_: Any) -> None:
    cfg = CONFIG or OperatorConfig.from_env()
    STATE.discovery = asyncio.create_task(_rediscover(cfg.discovery_interval))


async def _rediscover(interval: float) -> None:
    """Re-check for the Prometheus Operator's PodMonitor API every `interval` seconds: installed after
    the operator started, every known V4Deployment gets its PodMonitor without an operator restart."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        reconciler = STATE.reconciler
        assert reconciler is not None
        try:
            served = await loop.run_in_executor(None, reconciler.kube.has_api, *MONITORING_API)
        except Exception as e:  # the apiserver is briefly unreachable: try again next round
            log.warning("checking for the PodMonitor API failed: %s", e)
            continue
        if served == reconciler.options.monitoring:
            continue
        log.info(
            "PodMonitor API %s: resyncing %d V4Deployments", "appeared" if served else "went away", len(STATE.known)
        )
        reconciler.options = dataclasses.replace(reconciler.options, monitoring=served)
        for namespace, name in sorted(STATE.known):
            try:
                await loop.run_in_executor(None, _sync, namespace, name)
            except Exception as e:  # the object's own handler retries with backoff
                log.error("resync of %s/%s failed: %s", namespace, name, e)


@kopf.on.cleanup()
def cleanup(**_: Any) -> None:
    if STATE.discovery is not None:
        STATE.discovery.cancel()
        STATE.discovery = None
    if STATE.server is not None:
        STATE.server.shutdown()
        STATE.server = None


def backoff(retry: int) -> float:
    """Seconds before retry number `retry` (0 = the first) of a failed reconcile: 2, 4, 8, ... 120."""
    return float(min(MAX_BACKOFF_S, BACKOFF_S * 2 ** min(retry, 16)))


def _sync(namespace: str, name: str, body: Any = None, retry: int = 0) -> None:
    """Reconcile; a refusal by the apiserver becomes a kopf TemporaryError in the apiserver's own words
    (retried with exponential backoff, logged without a traceback). A Warning Event says each new
    failure once, not at every retry."""
    assert STATE.reconciler is not None
    key = (namespace, name)
    STATE.known.add(key)
    try:
        STATE.reconciler.sync(namespace, name)
    except Exception as e:
        detail = f"{type(e).__name__}: {api_message(e) if isinstance(e, ApiException) else e}"
        if body is not None and STATE.failures.get(key) != detail:
            STATE.failures[key] = detail
            STATE.reconciler.event(body, "Warning", "ReconcileFailed", detail)
        if isinstance(e, ApiException):
            raise kopf.TemporaryError(detail, delay=backoff(retry)) from e
        raise
    STATE.failures.pop(key, None)


@kopf.on.resume(GROUP, VERSION, PLURAL, backoff=BACKOFF_S)
@kopf.on.create(GROUP, VERSION, PLURAL, backoff=BACKOFF_S)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec", backoff=BACKOFF_S)
def reconcile(namespace: str, name: str, body: kopf.Body, retry: int, **_: Any) -> None:
    _sync(namespace, name, body, retry)


@kopf.on.event(GROUP, VERSION, PLURAL)
def deleted(type: str, namespace: str, name: str, uid: str, **_: Any) -> None:
    """Children go by ownerReference garbage collection (no finalizer); forget in-memory state."""
    if type == "DELETED" and STATE.reconciler is not None:
        STATE.reconciler.forget(namespace, name, uid)
        STATE.failures.pop((namespace, name), None)
        STATE.known.discard((namespace, name))


async def _child_event(namespace: str, labels: dict[str, str]) -> None:
    """A child changed (drift, KubeRay status, deletion): reconcile its owner, once per burst."""
    owner = labels.get(DEPLOYMENT_LABEL)
    if not owner:
        return
    key = (namespace, owner)
    if key in STATE.pending:
        return
    STATE.pending.add(key)
    try:
        await asyncio.sleep(COALESCE_S)
    finally:
        STATE.pending.discard(key)
    try:
        await asyncio.get_running_loop().run_in_executor(None, _sync, namespace, owner)
    except kopf.TemporaryError as e:  # the owner's handler retries with backoff
        log.error("reconcile of %s/%s after a child event failed: %s", namespace, owner, e)
    except Exception:  # logged; the next event or the owner's handler retries
        log.exception("reconcile of %s/%s after a child event failed", namespace, owner)


@kopf.on.event("ray.io", "v1", "rayservices", labels=OWNED)
@kopf.on.event("", "v1", "configmaps", labels=OWNED)
@kopf.on.event("", "v1", "services", labels=OWNED)
@kopf.on.event("", "v1", "serviceaccounts", labels=OWNED)
@kopf.on.event("rbac.authorization.k8s.io", "v1", "roles", labels=OWNED)
@kopf.on.event("rbac.authorization.k8s.io", "v1", "rolebindings", labels=OWNED)
async def child_event(namespace: str, labels: dict[str, str], **_: Any) -> None:
    await _child_event(namespace, labels)
