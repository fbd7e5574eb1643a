"""With the Prometheus Operator's PodMonitor API served, `v4d operator` adds an owned PodMonitor that
selects the deployment's Ray pods; without it (every other test here), none. The API may arrive
after the operator started (Prometheus Operator installed later): it is re-discovered periodically.

The Prometheus Operator's CRDs are not available here, so the API is served by a stand-in CRD of
our own with the real group, version, kind and an open schema: what is tested is the operator's
discovery, rendering, server-side apply and ownership, not the Prometheus Operator."""

from __future__ import annotations

import pytest
from helpers.kubecluster import stop_process, wait_established, wait_for
from helpers.opspecs import manifest
from kubernetes import client
from kubernetes.client.rest import ApiException

from v4d.serving.names import GROUP, PLURAL, VERSION

pytestmark = pytest.mark.apiserver

G, V, P = GROUP, VERSION, PLURAL
CRD = "podmonitors.monitoring.coreos.com"
STAND_IN = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": CRD},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {
            "plural": "podmonitors",
            "singular": "podmonitor",
            "kind": "PodMonitor",
            "listKind": "PodMonitorList",
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
            }
        ],
    },
}


def test_pod_monitor_when_the_prometheus_operator_api_appears(cluster, tmp_path):
    ext = client.ApiextensionsV1Api(cluster.api)
    ns = cluster.namespace("mon")
    log = tmp_path / "operator.log"
    proc = cluster.start_operator(log, "-n", ns, "--discovery-interval", "1")
    try:
        obj = cluster.custom().create_namespaced_custom_object(G, V, ns, P, manifest("watched"))
        wait_for(
            lambda: (
                (cluster.custom().get_namespaced_custom_object(G, V, ns, P, "watched").get("status") or {}).get("phase")
                == "Deploying"
            ),
            timeout=60,
            what="reconciled without the PodMonitor API",
        )
        assert "PodMonitors: False" in log.read_text()
        cluster.apply(STAND_IN)  # the Prometheus Operator is installed now
        wait_established(cluster.api, CRD)
        pm = wait_for(
            lambda: cluster.custom().get_namespaced_custom_object(
                "monitoring.coreos.com", "v1", ns, "podmonitors", "watched"
            ),
            timeout=60,
            what="PodMonitor",
        )
        assert "PodMonitor API appeared: resyncing" in log.read_text()
        assert pm["spec"]["selector"] == {"matchLabels": {"v4d.dev/deployment": "watched"}}
        assert pm["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "interval": "15s"}]
        assert pm["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]
        rs = cluster.custom().get_namespaced_custom_object("ray.io", "v1", ns, "rayservices", "watched")
        pods = [
            rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"],
            *(g["template"] for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]),
        ]
        for pod in pods:  # the PodMonitor's selector and port name find every Ray pod's metrics
            assert pod["metadata"]["labels"]["v4d.dev/deployment"] == "watched"
            assert any(p.get("name") == "metrics" for c in pod["spec"]["containers"] for p in c.get("ports", []))
    finally:
        stop_process(proc)
        try:  # the other operator tests run without the API
            ext.delete_custom_resource_definition(CRD)
        except ApiException as e:
            if e.status != 404:
                raise

        def gone() -> bool:
            try:
                ext.read_custom_resource_definition(CRD)
            except ApiException as e:
                if e.status == 404:
                    return True
                raise
            return False

        wait_for(gone, timeout=60, what="stand-in CRD deleted")
