"""Serving -> operator: engine autoscaling decisions reach status.scalingHistory through the ConfigMap.

One schema (`v4d.serving.decisions.DecisionsConfigMap`) for both sides: the Serve controller's
publisher (`v4d.serving.decision_publish`) patches the `<name>-autoscaling` ConfigMap of a real
apiserver; the operator (`status.autoscaling_view`) reads it back.
"""

import json

import pytest
import yaml

from v4d.operator import api, status
from v4d.serving.autoscale import kv_desired
from v4d.serving.decision_publish import ConfigMapTarget, DecisionPublisher, patch_configmap
from v4d.serving.decisions import DECISIONS_KEY, STATE_KEY, DecisionsConfigMap, ScalingRecord
from v4d.serving.names import STATUS_SCALING_HISTORY, ChildNames


def decision(t: float, frm: int, to: int, kv: list[float], waiting: list[float]) -> dict:
    _, figures = kv_desired(frm, kv, waiting, target_kv=0.7, target_waiting=4)
    direction = "up" if to > frm else "down"
    return {"time": t, "deployment": "engine", "from": frm, "to": to, "direction": direction, **figures}


UP = decision(1_767_000_000.0, 1, 2, kv=[0.95], waiting=[3])
DOWN = decision(1_767_000_600.0, 2, 1, kv=[0.1, 0.2], waiting=[0, 0])
HISTORY = [
    {
        "time": "2025-12-29T09:20:00Z",
        "from": 1,
        "to": 2,
        "reason": "KVPressureHigh",
        "kvCacheUtilization": 0.95,
        "waitingRequests": 3,
    },
    {
        "time": "2025-12-29T09:30:00Z",
        "from": 2,
        "to": 1,
        "reason": "KVPressureLow",
        "kvCacheUtilization": 0.15,
        "waitingRequests": 0,
    },
]


def test_schema_round_trips_and_matches_the_crd_item():
    content = DecisionsConfigMap.from_decisions([UP, DOWN])
    assert [r.to_json() for r in content.decisions] == HISTORY
    assert (content.target_replicas, content.kv_cache_utilization) == (1, 0.15)
    assert DecisionsConfigMap.from_data(content.to_data()) == content
    for item in HISTORY:  # what the writer produces is what the CRD accepts
        api.ScalingEvent.model_validate(item)
    # and the record has every field of the CRD's item: the two types are one schema on both layers
    crd_keys = {f.alias or name for name, f in api.ScalingEvent.model_fields.items()}
    assert set(content.decisions[0].to_json()) == crd_keys


def test_schema_keeps_the_newest_and_ignores_what_it_cannot_read():
    many = [decision(1_767_000_000.0 + i, 1, 2, kv=[0.9], waiting=[0]) for i in range(3 * STATUS_SCALING_HISTORY)]
    content = DecisionsConfigMap.from_decisions(many)
    assert len(content.decisions) == STATUS_SCALING_HISTORY
    assert content.decisions[-1] == ScalingRecord.from_decision(many[-1])
    assert DecisionsConfigMap.from_data(None) == DecisionsConfigMap()
    assert DecisionsConfigMap.from_data({DECISIONS_KEY: "not json"}) == DecisionsConfigMap()
    assert DecisionsConfigMap.from_data({DECISIONS_KEY: "{}", STATE_KEY: "[]"}) == DecisionsConfigMap()
    state = {"targetReplicas": "3", "kvCacheUtilization": 1}
    mixed = DecisionsConfigMap.from_data(
        {DECISIONS_KEY: json.dumps([HISTORY[0], "x", {"from": 1}]), STATE_KEY: json.dumps(state)}
    )
    assert [r.to_json() for r in mixed.decisions] == [HISTORY[0]]
    assert (mixed.target_replicas, mixed.kv_cache_utilization) == (None, 1.0)


@pytest.mark.apiserver
def test_engine_decisions_reach_the_status_view(cluster):
    ns = cluster.namespace("dec")
    name = ChildNames("demo").autoscaling
    cluster.core().create_namespaced_config_map(ns, {"metadata": {"name": name}})
    token = yaml.safe_load(cluster.kubeconfig.read_text())["users"][0]["user"]["token"]
    target = ConfigMapTarget(cluster.api.configuration.host, token, ns, name)

    patch_configmap(target, DecisionsConfigMap.from_decisions([UP, DOWN]))

    cm = cluster.api.sanitize_for_serialization(cluster.core().read_namespaced_config_map(name, ns))
    assert json.loads(cm["data"][STATE_KEY]) == {"targetReplicas": 1, "kvCacheUtilization": 0.15}
    view = status.autoscaling_view(cm)
    assert [r.to_json() for r in view.decisions] == HISTORY
    assert view.target_replicas == 1


def test_no_target_outside_kubernetes(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert ConfigMapTarget.in_cluster() is None
    assert DecisionPublisher().configmap is None
