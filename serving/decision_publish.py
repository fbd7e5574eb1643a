"""Publish engine autoscaling decisions to the `<deployment>-autoscaling` ConfigMap under KubeRay.

The operator renders that ConfigMap, a Ray-pod ServiceAccount allowed to get/patch only it, and
`V4D_DEPLOYMENT` in every Ray pod; the Serve controller (where the policy runs) merge-patches
`decisions.json` and `state.json`, which the operator copies into `status.scalingHistory`. Plain
HTTPS with the pod's token (stdlib only: serving does not import the Kubernetes client).
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
KEEP = 10  # the operator shows the last 10


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
        host, deployment = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("V4D_DEPLOYMENT")
        if not (host and deployment and (SA_DIR / "token").is_file()):
            return None
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        return cls(f"https://{host}:{port}", (SA_DIR / "token").read_text().strip(),
                   (SA_DIR / "namespace").read_text().strip(), f"{deployment}-autoscaling", str(SA_DIR / "ca.crt"))


def scaling_event(decision: dict[str, Any]) -> dict[str, Any]:
    """A KV policy decision (serving.autoscale) as the CRD's `status.scalingHistory[]` item."""
    return {
        "time": datetime.fromtimestamp(decision["time"], UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "from": decision["from"],
        "to": decision["to"],
        "reason": "KVPressureHigh" if decision["to"] > decision["from"] else "KVPressureLow",
        "kvCacheUtilization": decision["kv_mean"],
        "waitingRequests": int(decision["waiting"]),
    }


def publish(target: ConfigMapTarget, decisions: list[dict[str, Any]], timeout_s: float = 2.0) -> None:
    """Merge-patch the ConfigMap with the newest decisions and the state after the last one."""
    last = decisions[-1]
    data = {
        "decisions.json": json.dumps([scaling_event(d) for d in decisions[-KEEP:]]),
        "state.json": json.dumps({"targetReplicas": last["to"], "kvCacheUtilization": last["kv_mean"]}),
    }
    req = urllib.request.Request(
        f"{target.server}/api/v1/namespaces/{target.namespace}/configmaps/{target.name}",
        data=json.dumps({"data": data}).encode(),
        method="PATCH",
        headers={"Authorization": f"Bearer {target.token}", "Content-Type": "application/merge-patch+json"},
    )
    ctx = ssl.create_default_context(cafile=target.ca_file)
    if target.ca_file is None:
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with urllib.request.urlopen(req, timeout=timeout_s, context=ctx) as resp:
        resp.read()
