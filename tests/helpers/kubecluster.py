"""The local control plane for the operator tests and bench: start/stop through scripts/kube.sh,
install the CRDs (KubeRay's RayService CRD edited for Kubernetes 1.20), count writes from the audit log."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from v4d.operator.kube import request

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "operator" / "data"
RUN_DIR = ROOT / ".cache" / "kube"
CRD_FILES = [
    ROOT / "manifests" / "crd" / "serving.v4d.dev_v4deployments.yaml",
    ROOT / "manifests" / "kopf" / "kopf-peering-crds.yaml",
]


def kuberay_crd() -> dict[str, Any]:
    """KubeRay's RayService CRD with the three edits Kubernetes 1.20 needs (data/README.md)."""
    crd = yaml.safe_load(gzip.decompress((DATA / "ray.io_rayservices.yaml.gz").read_bytes()))

    def edit(node: Any) -> Any:
        if isinstance(node, list):
            return [edit(n) for n in node]
        if not isinstance(node, dict):
            return node
        node = {k: edit(v) for k, v in node.items() if k != "x-kubernetes-validations"}
        if node.get("default") == "":
            del node["default"]
        if node.get("x-kubernetes-list-type") == "map":
            item = node.get("items") or {}
            props, required = item.get("properties") or {}, set(item.get("required") or [])
            keys = node.get("x-kubernetes-list-map-keys") or []
            if any(k not in required and "default" not in props.get(k, {}) for k in keys):
                node.pop("x-kubernetes-list-type")
                node.pop("x-kubernetes-list-map-keys", None)
        return node

    return edit(crd)


@dataclass
class Cluster:
    kubeconfig: Path  # admin, for the tests
    operator_kubeconfig: Path  # a separate user, so the audit log counts the operator's writes alone
    audit_log: Path
    api: client.ApiClient

    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    def apply(self, obj: dict[str, Any], manager: str = "v4d-tests") -> dict[str, Any]:
        """Server-side apply any object (CRDs too big for client-side apply included)."""
        group_version = obj["apiVersion"]
        prefix = f"/api/{group_version}" if "/" not in group_version else f"/apis/{group_version}"
        plural = {"CustomResourceDefinition": "customresourcedefinitions", "Namespace": "namespaces"}[obj["kind"]]
        url = f"{prefix}/{plural}/{obj['metadata']['name']}"
        return request(
            self.api, "PATCH", url, obj, "application/apply-patch+yaml", [("fieldManager", manager), ("force", "true")]
        )

    def namespace(self, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.core().create_namespace({"metadata": {"name": name}})
        return name

    def forbid_services(self, ns: str) -> None:
        """A ResourceQuota allowing no Services in `ns`, returned once it is enforced: quota admission
        ignores a quota until kube-controller-manager has filled in its `status.hard`."""
        self.core().create_namespaced_resource_quota(
            ns, {"metadata": {"name": "no-services"}, "spec": {"hard": {"services": "0"}}}
        )
        wait_for(
            lambda: (
                (self.core().read_namespaced_resource_quota("no-services", ns).status.hard or {}).get("services") == "0"
            ),
            what=f"the quota in {ns} to be enforced",
        )

    def start_operator(self, log: Path, *args: str) -> subprocess.Popen:
        """`v4d operator ARGS` as a process, with the operator's own identity (its writes are audited
        apart from the tests'), logging to `log`. Stop it with `stop_process`."""
        env = {**os.environ, "KUBECONFIG": str(self.operator_kubeconfig)}
        with open(log, "a") as out:
            return subprocess.Popen(
                [str(Path(sys.executable).parent / "v4d"), "operator", *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def writes(self, user: str = "v4d-operator") -> list[dict[str, Any]]:
        """Write requests by `user` so far (create/update/patch/delete), from the audit log."""
        out = []
        for line in self.audit_log.read_text().splitlines():
            ev = json.loads(line)
            if ev.get("stage") == "ResponseComplete" and ev["user"]["username"] == user:
                out.append(ev)
        return out


def start() -> None:
    proc = subprocess.run(
        [str(ROOT / "scripts" / "kube.sh"), "start"],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "V4D_KUBE_DIR": str(RUN_DIR)},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/kube.sh start failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


def wait_for(check, timeout: float = 30.0, interval: float = 0.2, what: str = "condition"):
    """Poll `check()` until it returns a truthy value; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except ApiException as e:
            if e.status != 404:
                raise
            last = None
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def stop() -> None:
    subprocess.run(
        [str(ROOT / "scripts" / "kube.sh"), "stop"], env={**os.environ, "V4D_KUBE_DIR": str(RUN_DIR)}, timeout=60
    )


def connect_and_install() -> Cluster:
    """Client for the started control plane, with every CRD the operator needs established."""
    api = config.new_client_from_config(config_file=str(RUN_DIR / "kubeconfig"))
    c = Cluster(RUN_DIR / "kubeconfig", RUN_DIR / "operator.kubeconfig", RUN_DIR / "audit.log", api)
    for path in CRD_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            c.apply(doc)
    c.apply(kuberay_crd())
    for name in ("v4deployments.serving.v4d.dev", "rayservices.ray.io", "clusterkopfpeerings.kopf.dev"):
        wait_established(api, name)
    wait_for(
        lambda: client.CoreV1Api(api).read_namespaced_service_account("default", "default"),
        timeout=60,
        what="the controller-manager (default ServiceAccount)",
    )
    return c


def wait_established(api: client.ApiClient, crd: str) -> None:
    """Until the apiserver serves the API of CRD `crd` (its Established condition)."""
    ext = client.ApiextensionsV1Api(api)
    wait_for(
        lambda: any(
            c.type == "Established" and c.status == "True"
            for c in ext.read_custom_resource_definition(crd).status.conditions or []
        ),
        what=f"CRD {crd} established",
    )


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM (the operator's graceful exit), then SIGKILL if it is still running after 20 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
