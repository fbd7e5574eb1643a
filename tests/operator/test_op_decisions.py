"""Serving -> operator: engine autoscaling decisions reach status.scalingHistory through the ConfigMap.

The Serve controller's side (`v4d.serving.decision_publish`) patches the `<name>-autoscaling` ConfigMap
of a real apiserver; the operator's side (`status.autoscaling_view`) reads it back.
"""

import json

import yaml

from v4d.operator import status
from v4d.serving.autoscale import kv_desired
from v4d.serving.decision_publish import ConfigMapTarget, publish


def decision(t: float, frm: int, to: int, kv: list[float], waiting: list[float]) -> dict:
    _, figures = kv_desired(frm, kv, waiting, target_kv=0.7, target_waiting=4)
    return {"time": t, "deployment": "engine", "from": frm, "to": to, "direction": "up" if to > frm else "down",
            **figures}


def test_engine_decisions_reach_the_status_view(cluster):
    ns = cluster.namespace("dec")
    name = "demo-autoscaling"
    cluster.core().create_namespaced_config_map(ns, {"metadata": {"name": name}})
    token = yaml.safe_load(cluster.kubeconfig.read_text())["users"][0]["user"]["token"]
    target = ConfigMapTarget(cluster.api.configuration.host, token, ns, name)

    up = decision(1_767_000_000.0, 1, 2, kv=[0.95], waiting=[3])
    down = decision(1_767_000_600.0, 2, 1, kv=[0.1, 0.2], waiting=[0, 0])
    publish(target, [up, down])

    cm = cluster.api.sanitize_for_serialization(cluster.core().read_namespaced_config_map(name, ns))
    assert json.loads(cm["data"]["state.json"]) == {"targetReplicas": 1, "kvCacheUtilization": 0.15}
    view = status.autoscaling_view(cm)
    assert view["scalingHistory"] == [
        {"time": "2025-12-29T09:20:00Z", "from": 1, "to": 2, "reason": "KVPressureHigh",
         "kvCacheUtilization": 0.95, "waitingRequests": 3},
        {"time": "2025-12-29T09:30:00Z", "from": 2, "to": 1, "reason": "KVPressureLow",
         "kvCacheUtilization": 0.15, "waitingRequests": 0},
    ]
    assert view["targetReplicas"] == 1


def test_no_target_outside_kubernetes(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert ConfigMapTarget.in_cluster() is None
