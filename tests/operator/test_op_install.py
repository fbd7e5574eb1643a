"""Install paths: `kubectl apply -k manifests/` and the Helm chart (lint, template, install) against
the local apiserver, with the real kubectl and helm v3 binaries."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers.kubecluster import ROOT, wait_for

from v4d.operator.kube import request

pytestmark = pytest.mark.apiserver

HELM = ROOT / ".tools" / "bin" / "helm"
CHART = ROOT / "charts" / "v4d"


def run(cmd: list[str], cluster=None, tmp: Path | None = None, check: bool = True, stdin: str | None = None):
    env = dict(os.environ)
    if cluster is not None:
        env["KUBECONFIG"] = str(cluster.kubeconfig)
    if tmp is not None:  # helm keeps caches and config under these
        env.update(
            HOME=str(tmp),
            XDG_CACHE_HOME=str(tmp / "cache"),
            XDG_CONFIG_HOME=str(tmp / "config"),
            XDG_DATA_HOME=str(tmp / "data"),
        )
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, input=stdin)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    return proc


@pytest.fixture(scope="module")
def helm():
    assert HELM.exists(), "helm is missing: run scripts/setup-kube.sh"
    return str(HELM)


def test_kustomize_builds_offline():
    docs = list(yaml.safe_load_all(run(["kubectl", "kustomize", str(ROOT / "manifests")]).stdout))
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("CustomResourceDefinition", "v4deployments.serving.v4d.dev") in kinds
    assert ("Deployment", "v4d-operator") in kinds and ("ClusterRole", "v4d-operator") in kinds
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"]["requests"] and container["livenessProbe"] and container["readinessProbe"]
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    verbs = {v for rule in role["rules"] for v in rule["verbs"]}
    assert "delete" not in verbs and "*" not in verbs  # deletion is garbage collection's job


def test_kubectl_apply_k(cluster, tmp_path):
    run(["kubectl", "apply", "-k", str(ROOT / "manifests")], cluster)
    deploy = request(cluster.api, "GET", "/apis/apps/v1/namespaces/v4d-system/deployments/v4d-operator")
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == "v4d-operator"
    # The samples pass the CRD's real validation (server-side dry run).
    run(["kubectl", "apply", "--dry-run=server", "-n", "default", "-f", str(ROOT / "manifests" / "samples")], cluster)
    # A bad sample does not.
    bad = (ROOT / "manifests" / "samples" / "v4-flash-h200.yaml").read_text().replace("vendor: nvidia", "vendor: amd")
    proc = run(["kubectl", "apply", "--dry-run=server", "-n", "default", "-f", "-"], cluster, check=False, stdin=bad)
    assert proc.returncode != 0 and "spec.pools.vendor" in proc.stderr


def test_helm_lint_and_template(helm, tmp_path):
    run([helm, "lint", "--strict", str(CHART)], tmp=tmp_path)
    out = run(
        [
            helm,
            "template",
            "rel",
            str(CHART),
            "-n",
            "v4d",
            "--set",
            "replicaCount=2",
            "--set",
            "serviceMonitor.enabled=true",
            "--set",
            "webhook.enabled=true",
            "--set",
            "webhook.certSecret=tls",
            "--set",
            "watchNamespaces={team-a,team-b}",
        ],
        tmp=tmp_path,
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ClusterRole", "ClusterRoleBinding", "ServiceAccount", "ServiceMonitor"} <= kinds
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--peering=v4d" in args and "--namespace=team-a" in args and "--webhook-port=9443" in args
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    assert any("validatingwebhookconfigurations" in r["resources"] for r in role["rules"])
    no_cert = run([helm, "template", "rel", str(CHART), "--set", "webhook.enabled=true"], tmp=tmp_path, check=False)
    assert no_cert.returncode != 0 and "webhook.certSecret is required" in no_cert.stderr
    plain = run([helm, "template", "rel", str(CHART)], tmp=tmp_path).stdout
    assert "ServiceMonitor" not in plain and "--peering" not in plain
    # values.schema.json rejects bad values.
    bad = run([helm, "lint", str(CHART), "--set", "replicaCount=0"], tmp=tmp_path, check=False)
    assert bad.returncode != 0 and "replicaCount" in (bad.stdout + bad.stderr)


def test_helm_install(cluster, helm, tmp_path):
    ns = cluster.namespace("helm")
    # Release "rel": its cluster-scoped RBAC must not collide with the kubectl install's "v4d-operator".
    run([helm, "install", "rel", str(CHART), "-n", ns, "--wait=false"], cluster, tmp=tmp_path)
    try:
        deploy = wait_for(
            lambda: request(cluster.api, "GET", f"/apis/apps/v1/namespaces/{ns}/deployments/rel-v4d-operator"),
            what="operator Deployment",
        )
        container = deploy["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == "v4d/operator:0.1.0" and container["args"][0] == "operator"
        listed = run([helm, "list", "-n", ns, "-o", "yaml"], cluster, tmp=tmp_path).stdout
        assert yaml.safe_load(listed)[0]["status"] == "deployed"
    finally:
        run([helm, "uninstall", "rel", "-n", ns], cluster, tmp=tmp_path)
