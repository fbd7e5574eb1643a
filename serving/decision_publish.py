"""Where autoscaling decisions go once a policy (`v4d.serving.autoscale`) has made them.

`DecisionPublisher.publish(app, decision)` appends the decision to the app's bounded history in Ray's
internal KV (served by the ingress at `GET /v4d/autoscaling`) and, under KubeRay, merge-patches the
engine decisions into the `<deployment>-autoscaling` ConfigMap (schema: `v4d.serving.decisions`), which
the operator copies into `status.scalingHistory`. The operator renders that ConfigMap, a Ray-pod
ServiceAccount allowed to get/patch only it, and `V4D_DEPLOYMENT` in every Ray pod. The patch is plain
HTTPS with the pod's token (stdlib only: serving does not import the Kubernetes client).
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from v4d.serving.decisions import DecisionsConfigMap
from v4d.serving.names import DEPLOYMENT_ENV, RAY_KV_SCALING_HISTORY, ChildNames

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_KV_NAMESPACE = "v4d"
log = logging.getLogger(__name__)


def decisions_key(app: str) -> str:
    return f"v4d/autoscaling/{app}"


def read_decisions(app: str) -> list[dict[str, Any]]:
    """The recorded decisions of `app`, oldest first ([] outside Ray)."""
    from ray.experimental import internal_kv

    if not internal_kv._internal_kv_initialized():
        return []
    raw = internal_kv._internal_kv_get(decisions_key(app), namespace=_KV_NAMESPACE)
    return json.loads(raw) if raw else []


def is_engine_decision(decision: dict[str, Any]) -> bool:
    """KV-pressure (engine) decisions carry `kv_mean`; the operator shows attention replicas only."""
    return "kv_mean" in decision


@dataclass(frozen=True)
class ConfigMapTarget:
    server: str  # https://host:port of the apiserver
    token: str
    namespace: str
    name: str
    ca_file: str | None = None  # None: no TLS verification (loopback test clusters only)

    @classmethod
    def in_cluster(cls) -> ConfigMapTarget | None:
        """The pod's own target, or None outside Kubernetes (e.g. `v4d serve`)."""
        host, deployment = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get(DEPLOYMENT_ENV)
        if not (host and deployment and (SA_DIR / "token").is_file()):
            return None
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        return cls(
            f"https://{host}:{port}",
            (SA_DIR / "token").read_text().strip(),
            (SA_DIR / "namespace").read_text().strip(),
            ChildNames(deployment).autoscaling,
            str(SA_DIR / "ca.crt"),
        )


def patch_configmap(target: ConfigMapTarget, content: DecisionsConfigMap, timeout_s: float = 2.0) -> None:
    """Merge-patch the ConfigMap's data with `content`."""
    req = urllib.request.Request(
        f"{target.server}/api/v1/namespaces/{target.namespace}/configmaps/{target.name}",
        data=json.dumps({"data": content.to_data()}).encode(),
        method="PATCH",
        headers={"Authorization": f"Bearer {target.token}", "Content-Type": "application/merge-patch+json"},
    )
    ctx = ssl.create_default_context(cafile=target.ca_file)
    if target.ca_file is None:
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with urllib.request.urlopen(req, timeout=timeout_s, context=ctx) as resp:
        resp.read()


class DecisionPublisher:
    """Records decisions in Ray's internal KV and, under KubeRay, in the decisions ConfigMap.

    `configmap`: where engine decisions go; by default the pod's own (`ConfigMapTarget.in_cluster()`),
    None outside Kubernetes."""

    def __init__(self, configmap: ConfigMapTarget | None = None, history: int = RAY_KV_SCALING_HISTORY):
        self.configmap = configmap if configmap is not None else ConfigMapTarget.in_cluster()
        self.history = history

    def publish(self, app: str, decision: dict[str, Any]) -> None:
        from ray.experimental import internal_kv

        if not internal_kv._internal_kv_initialized():
            return
        decisions = read_decisions(app)[-(self.history - 1) :] + [decision]
        internal_kv._internal_kv_put(decisions_key(app), json.dumps(decisions), overwrite=True, namespace=_KV_NAMESPACE)
        if self.configmap is not None and is_engine_decision(decision):
            content = DecisionsConfigMap.from_decisions([d for d in decisions if is_engine_decision(d)])
            try:
                patch_configmap(self.configmap, content)
            except OSError as e:  # scaling must go on when the apiserver is unreachable
                log.warning("could not publish the autoscaling decision: %s", e)
