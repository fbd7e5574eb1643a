"""V4Deployment status without a cluster (pure): KubeRay's RayService status and the autoscaling
ConfigMap aggregated into replicas, conditions and phase; stable when nothing changed."""

from __future__ import annotations

import json

from helpers.opspecs import tiny_spec

from v4d.operator import render, status
from v4d.operator.api import CONDITIONS, V4DeploymentStatus
from v4d.operator.planner import plan
from v4d.serving.names import STATUS_SCALING_HISTORY


def kuberay_status(plan_obj, healthy=True, ready=True):
    deps = {"Ingress": {"status": "HEALTHY"}, "Engine": {"status": "HEALTHY" if healthy else "UNHEALTHY"}}
    for s in plan_obj.shards:
        deps[s.name] = {"status": "HEALTHY"}
    return {
        "observedGeneration": 1,
        "conditions": [
            {
                "type": "Ready",
                "status": "True" if ready else "False",
                "reason": "NonZeroServeEndpoints",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
                "message": "",
            }
        ],
        "activeServiceStatus": {
            "applicationStatuses": {
                "demo": {"status": "RUNNING" if healthy else "UNHEALTHY", "serveDeploymentStatuses": deps}
            },
            "rayClusterStatus": {"desiredWorkerReplicas": 3, "readyWorkerReplicas": 3},
        },
    }


def test_status_aggregates_kuberay_and_autoscaling():
    spec = tiny_spec()
    p = plan(spec, name="demo")
    groups = render.layout(p, spec)
    rs = {"metadata": {"generation": 1}, "status": kuberay_status(p)}
    cm = {
        "data": {
            "decisions.json": json.dumps(
                [
                    {
                        "time": f"2026-01-01T00:00:0{i}Z",
                        "from": 1,
                        "to": 2,
                        "reason": "KVPressureHigh",
                        "kvCacheUtilization": 0.9,
                    }
                    for i in range(9)
                ]
                * 2
            ),
            "state.json": json.dumps({"kvCacheUtilization": 0.81234567, "targetReplicas": 2}),
        }
    }
    st = status.compute(
        name="demo", generation=1, plan=p, groups=groups, rayservice=rs, autoscaling_cm=cm, previous={}, now="t0"
    )
    assert st["phase"] == "Ready"
    assert st["replicas"] == {"attention": {"desired": 2, "ready": 2}, "experts": {"desired": 2, "ready": 2}}
    assert st["kvCacheUtilization"] == 0.8123 and len(st["scalingHistory"]) == STATUS_SCALING_HISTORY
    assert st["selector"] == "v4d.dev/deployment=demo,v4d.dev/role=attention"
    # the conditions set are exactly the API's list (the CRD's enum and the README come from it), in its order
    assert [c["type"] for c in st["conditions"]] == list(CONDITIONS)
    V4DeploymentStatus.model_validate(st)  # what the operator writes is what the CRD accepts
    # Recomputing later gives the same dict (transition times kept): the operator writes nothing.
    assert (
        status.compute(
            name="demo", generation=1, plan=p, groups=groups, rayservice=rs, autoscaling_cm=cm, previous=st, now="t1"
        )
        == st
    )
    rs_bad = {"metadata": {"generation": 1}, "status": kuberay_status(p, healthy=False)}
    bad = status.compute(
        name="demo", generation=1, plan=p, groups=groups, rayservice=rs_bad, autoscaling_cm=cm, previous=st, now="t2"
    )
    cond = {c["type"]: c for c in bad["conditions"]}
    assert bad["phase"] == "Degraded" and cond["Degraded"]["message"] == "unhealthy: Engine"
    assert cond["Ready"]["status"] == "False" and cond["Ready"]["lastTransitionTime"] == "t2"
    assert cond["Planned"]["lastTransitionTime"] == "t0"


def test_refused_apply_degrades_and_keeps_the_rest():
    spec = tiny_spec()
    p = plan(spec, name="demo")
    st = status.compute(
        name="demo",
        generation=1,
        plan=p,
        groups=render.layout(p, spec),
        rayservice=None,
        autoscaling_cm=None,
        previous={},
        now="t0",
    )
    bad = status.apply_failed_status("applying Service demo-api: exceeded quota", 2, st, "t1")
    cond = {c["type"]: c for c in bad["conditions"]}
    assert bad["phase"] == "Degraded" and bad["observedGeneration"] == 2 and bad["plan"] == st["plan"]
    assert cond["Degraded"] == {
        "type": "Degraded",
        "status": "True",
        "reason": "ApplyFailed",
        "message": "applying Service demo-api: exceeded quota",
        "lastTransitionTime": "t1",
        "observedGeneration": 2,
    }
    assert cond["Planned"] == {c["type"]: c for c in st["conditions"]}["Planned"]
    assert set(cond) == set(CONDITIONS)
