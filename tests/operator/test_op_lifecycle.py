"""The operator against a real kube-apiserver (KopfRunner): create -> children -> KubeRay status ->
Ready; in-place update; /scale; drift; idempotency by audit-log write counts; invalid specs; GC."""

from __future__ import annotations

import json
import os
import time

import pytest
import yaml
from helpers.kubecluster import wait_for
from helpers.opspecs import manifest, tiny_spec
from kopf.testing import KopfRunner
from kubernetes.client.rest import ApiException

from v4d.operator import handlers, render
from v4d.operator.kube import contains
from v4d.operator.planner import plan
from v4d.serving.names import GROUP, PLURAL, VERSION, ChildNames

pytestmark = pytest.mark.apiserver

G, V, P = GROUP, VERSION, PLURAL
METRICS_PORT = 8401


@pytest.fixture(scope="module")
def operator(cluster):
    old = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(cluster.operator_kubeconfig)  # read at startup by the login handler
    handlers.CONFIG = handlers.OperatorConfig(metrics_port=METRICS_PORT, metrics_addr="127.0.0.1")
    try:
        with KopfRunner(["run", "-A", "--standalone", "-m", "v4d.operator.handlers"]) as runner:
            wait_for(lambda: handlers.STATE.reconciler is not None, what="operator startup")
            yield runner
    finally:
        handlers.CONFIG = None
        if old is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = old
    assert runner.exit_code == 0, runner.output[-3000:]


def get_v4d(cluster, ns, name):
    return cluster.custom().get_namespaced_custom_object(G, V, ns, P, name)


def get_rs(cluster, ns, name):
    return cluster.custom().get_namespaced_custom_object("ray.io", "v1", ns, "rayservices", name)


def condition(obj, type_):
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def events(cluster, ns, name):
    evs = cluster.core().list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
    return [(e.type, e.reason, e.message) for e in evs]


def settle(cluster, still: float = 1.5, timeout: float = 60.0) -> None:
    """Wait until the operator has written nothing for `still` seconds (a write loop never settles)."""
    deadline = time.monotonic() + timeout
    count, since = len(cluster.writes()), time.monotonic()
    while time.monotonic() - since < still:
        assert time.monotonic() < deadline, "the operator keeps writing"
        time.sleep(0.3)
        now = len(cluster.writes())
        if now != count:
            count, since = now, time.monotonic()


def quiet_writes(cluster, seconds: float = 3.0) -> list:
    """Writes the operator makes in `seconds` once settled, with nothing changing."""
    settle(cluster)
    before = len(cluster.writes())
    time.sleep(seconds)
    return [
        (w["verb"], w["objectRef"].get("resource"), w["objectRef"].get("name"), w["objectRef"].get("subresource"))
        for w in cluster.writes()[before:]
    ]


def kuberay_status(p, generation, ready=True):
    """What KubeRay writes once the cluster runs and every Serve deployment is healthy."""
    deps = {"V4Ingress": {"status": "HEALTHY"}, "AttentionEngine": {"status": "HEALTHY" if ready else "UPDATING"}}
    deps.update({s.name: {"status": "HEALTHY"} for s in p.shards})
    return {
        "observedGeneration": generation,
        "conditions": [
            {
                "type": "Ready",
                "status": "True" if ready else "False",
                "reason": "NonZeroServeEndpoints",
                "message": "serving",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }
        ],
        "activeServiceStatus": {
            "applicationStatuses": {p.name: {"status": "RUNNING", "serveDeploymentStatuses": deps}},
            "rayClusterStatus": {"desiredWorkerReplicas": 3, "readyWorkerReplicas": 3},
        },
        "numServeEndpoints": 1,
    }


def test_lifecycle(cluster, operator):
    ns = cluster.namespace("life")
    custom = cluster.custom()
    spec = tiny_spec(serving={**tiny_spec()["serving"], "apiKeySecretRef": {"name": "demo-api-key", "key": "token"}})
    v4d = custom.create_namespaced_custom_object(G, V, ns, P, {**manifest("demo", spec), "metadata": {"name": "demo"}})
    uid = v4d["metadata"]["uid"]

    # Children exist, owned, and survive the real RayService schema unpruned.
    rs = wait_for(lambda: get_rs(cluster, ns, "demo"), what="RayService")
    p = plan(spec, name="demo")
    want = {
        (c["kind"], c["metadata"]["name"]): c
        for c in render.render(p, spec, {"name": "demo", "namespace": ns, "uid": uid})
    }
    assert contains(rs, want[("RayService", "demo")]), "the apiserver pruned or changed rendered RayService fields"
    groups = {g["groupName"]: g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert set(groups) == {"gpu-attention", "gpu-experts", "npu-experts"}
    for g in [rs["spec"]["rayClusterConfig"]["headGroupSpec"], *groups.values()]:  # the key, from the Secret
        env = {e["name"]: e for e in g["template"]["spec"]["containers"][0]["env"]}
        assert env["V4D_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "demo-api-key", "key": "token"}}
    assert groups["npu-experts"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {
        "huawei.com/Ascend910": "1"
    }
    assert json.loads(json.loads(groups["npu-experts"]["rayStartParams"]["resources"])) == {"NPU": 1}
    assert groups["gpu-attention"]["labels"] == {"v4d.dev/pool": "gpu", "v4d.dev/role": "attention"}
    serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
    assert serve["applications"][0]["args"]["plan"] == p.to_dict()
    cm = cluster.core().read_namespaced_config_map("demo-plan", ns)
    assert json.loads(cm.data["plan.json"]) == p.to_dict()
    svc = cluster.core().read_namespaced_service("demo-api", ns)
    assert svc.spec.selector["v4d.dev/deployment"] == "demo" and svc.metadata.owner_references[0].uid == uid
    for kind, name in want:
        assert kind in ("RayService", "ConfigMap", "Service", "ServiceAccount", "Role", "RoleBinding"), name

    st = wait_for(
        lambda: (
            (get_v4d(cluster, ns, "demo").get("status") or {}).get("plan") and get_v4d(cluster, ns, "demo")["status"]
        ),
        what="status with plan",
    )
    assert st["phase"] == "Deploying" and st["plan"]["expertShards"] == 2
    assert condition(get_v4d(cluster, ns, "demo"), "Planned")["status"] == "True"
    assert any(
        t == "Normal" and r == "Applied" and "created RayService demo" in m for t, r, m in events(cluster, ns, "demo")
    )

    # KubeRay reports the app healthy -> Ready with replicas aggregated per role.
    custom.patch_namespaced_custom_object_status(
        "ray.io", "v1", ns, "rayservices", "demo", {"status": kuberay_status(p, rs["metadata"]["generation"])}
    )
    ready = wait_for(
        lambda: (o := get_v4d(cluster, ns, "demo"))["status"]["phase"] == "Ready" and o, what="phase Ready"
    )
    assert ready["status"]["replicas"] == {
        "attention": {"desired": 1, "ready": 1},
        "experts": {"desired": 2, "ready": 2},
    }
    assert condition(ready, "Ready")["reason"] == "AllReplicasReady"

    # Converged: nothing to write, even when a child event forces a reconcile.
    assert quiet_writes(cluster) == []
    custom.patch_namespaced_custom_object(
        "ray.io", "v1", ns, "rayservices", "demo", {"metadata": {"labels": {"someone.else/label": "x"}}}
    )
    assert quiet_writes(cluster) == []

    # Serving-only change: serveConfigV2 updated in place, rayClusterConfig untouched.
    cluster_before = get_rs(cluster, ns, "demo")["spec"]["rayClusterConfig"]
    custom.patch_namespaced_custom_object(G, V, ns, P, "demo", {"spec": {"serving": {"maxQueue": 7}}})
    rs2 = wait_for(
        lambda: (r := get_rs(cluster, ns, "demo")) and "max_queue: 7" in r["spec"]["serveConfigV2"] and r,
        what="serveConfigV2 update",
    )
    assert rs2["spec"]["rayClusterConfig"] == cluster_before
    wait_for(
        lambda: any(
            r == "Applied" and "updated RayService demo in place" in m for _, r, m in events(cluster, ns, "demo")
        ),
        what="in-place update Event",
    )

    # /scale: attention replicas 1 -> 2 through the scale subresource (what HPA/KEDA do).
    custom.patch_namespaced_custom_object_scale(G, V, ns, P, "demo", {"spec": {"replicas": 2}})
    rs3 = wait_for(
        lambda: (
            (r := get_rs(cluster, ns, "demo"))
            and {g["groupName"]: g["replicas"] for g in r["spec"]["rayClusterConfig"]["workerGroupSpecs"]}[
                "gpu-attention"
            ]
            == 2
            and r
        ),
        what="attention group scaled",
    )
    assert yaml.safe_load(rs3["spec"]["serveConfigV2"])["applications"][0]["args"]["plan"]["engine"]["replicas"] == 2
    scale = wait_for(
        lambda: (s := custom.get_namespaced_custom_object_scale(G, V, ns, P, "demo"))["status"].get("selector") and s,
        what="scale status",
    )
    assert (
        scale["spec"]["replicas"] == 2
        and scale["status"]["selector"] == "v4d.dev/deployment=demo,v4d.dev/role=attention"
    )

    # Drift: someone edits a field the operator owns -> taken back.
    custom.patch_namespaced_custom_object(
        "ray.io",
        "v1",
        ns,
        "rayservices",
        "demo",
        {"spec": {"rayClusterConfig": {"headGroupSpec": {"rayStartParams": {"dashboard-host": "127.0.0.1"}}}}},
    )
    wait_for(
        lambda: (
            get_rs(cluster, ns, "demo")["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["dashboard-host"]
            == "0.0.0.0"
        ),
        what="drift corrected",
    )
    cluster.core().delete_namespaced_config_map("demo-plan", ns)
    wait_for(lambda: cluster.core().read_namespaced_config_map("demo-plan", ns), what="deleted child recreated")

    # Delete: owner-reference garbage collection removes every child (no finalizers involved).
    assert not get_v4d(cluster, ns, "demo")["metadata"].get("finalizers")
    custom.delete_namespaced_custom_object(G, V, ns, P, "demo")
    wait_for(
        lambda: (
            not custom.list_namespaced_custom_object("ray.io", "v1", ns, "rayservices")["items"]
            and not [
                c for c in cluster.core().list_namespaced_config_map(ns).items if c.metadata.name.startswith("demo")
            ]
        ),
        timeout=60,
        what="children garbage-collected",
    )


def test_invalid_specs(cluster, operator):
    ns = cluster.namespace("bad")
    custom = cluster.custom()
    # What a schema can say, the apiserver rejects.
    bad = tiny_spec(pools=[{**tiny_spec()["pools"][0], "vendor": "amd"}, tiny_spec()["pools"][1]])
    with pytest.raises(ApiException) as err:
        custom.create_namespaced_custom_object(G, V, ns, P, manifest("schema", bad))
    assert err.value.status == 422 and "spec.pools.vendor" in err.value.body  # 1.20 omits list indices
    # What it cannot (min > max), the operator reports: Invalid condition + Event, nothing applied.
    custom.create_namespaced_custom_object(
        G,
        V,
        ns,
        P,
        manifest("semantic", tiny_spec(autoscaling={"enabled": True, "minReplicas": 3, "maxReplicas": 2}, replicas=3)),
    )
    obj = wait_for(
        lambda: (o := get_v4d(cluster, ns, "semantic")).get("status", {}).get("phase") == "Failed" and o,
        what="phase Failed",
    )
    inv = condition(obj, "Invalid")
    assert (
        inv["status"] == "True" and inv["reason"] == "SpecInvalid" and "spec.autoscaling.minReplicas" in inv["message"]
    )
    wait_for(
        lambda: any(
            t == "Warning" and r == "SpecInvalid" and "spec.autoscaling.minReplicas" in m
            for t, r, m in events(cluster, ns, "semantic")
        ),
        what="Invalid Event",
    )
    assert custom.list_namespaced_custom_object("ray.io", "v1", ns, "rayservices")["items"] == []
    assert [
        c.metadata.name
        for c in cluster.core().list_namespaced_config_map(ns).items
        if c.metadata.name.startswith("semantic")
    ] == []
    assert quiet_writes(cluster, 2) == []
    # Fixing the spec applies everything.
    custom.patch_namespaced_custom_object(
        G, V, ns, P, "semantic", {"spec": {"replicas": 2, "autoscaling": {"minReplicas": 1}}}
    )
    wait_for(lambda: get_rs(cluster, ns, "semantic"), what="RayService after the fix")
    wait_for(
        lambda: condition(get_v4d(cluster, ns, "semantic"), "Invalid").get("status") == "False", what="Invalid cleared"
    )


def test_many_objects_reconcile_together(cluster, operator):
    ns = cluster.namespace("many")
    custom = cluster.custom()
    n = 100
    before = len(cluster.writes())
    t0 = time.monotonic()
    for i in range(n):
        custom.create_namespaced_custom_object(G, V, ns, P, manifest(f"m{i:03d}"))
    wait_for(
        lambda: (
            len(custom.list_namespaced_custom_object("ray.io", "v1", ns, "rayservices")["items"]) == n
            and all(
                (o.get("status") or {}).get("phase") == "Deploying"
                for o in custom.list_namespaced_custom_object(G, V, ns, P)["items"]
            )
        ),
        timeout=240,
        interval=1,
        what=f"{n} deployments reconciled",
    )
    elapsed = time.monotonic() - t0
    rss = custom.list_namespaced_custom_object("ray.io", "v1", ns, "rayservices")["items"]
    owners = [r["metadata"]["ownerReferences"][0]["name"] for r in rss]
    assert sorted(owners) == [f"m{i:03d}" for i in range(n)]  # one each, no duplicates
    writes = cluster.writes()[before:]
    per_object = len(writes) / n
    # 7 children + 1 status + Events + kopf's annotation: a fixed small number per object.
    assert per_object < 20, f"{per_object:.1f} writes per object"
    assert quiet_writes(cluster, 3) == []
    print(f"{n} objects reconciled in {elapsed:.1f}s, {per_object:.1f} writes per object")


def test_refused_child_is_reported_and_retried(cluster, operator):
    """The apiserver refuses a child (a ResourceQuota allows no Services): Degraded with the apiserver's
    words and a Warning Event; once the quota is lifted the retries converge with nothing lost."""
    ns = cluster.namespace("quota")
    core, custom = cluster.core(), cluster.custom()
    cluster.forbid_services(ns)
    custom.create_namespaced_custom_object(G, V, ns, P, manifest("refused"))
    obj = wait_for(
        lambda: condition(o := get_v4d(cluster, ns, "refused"), "Degraded").get("reason") == "ApplyFailed" and o,
        timeout=60,
        what="Degraded: ApplyFailed",
    )
    deg = condition(obj, "Degraded")
    assert obj["status"]["phase"] == "Degraded" and deg["status"] == "True"
    assert deg["message"].startswith("applying Service ") and "exceeded quota" in deg["message"], deg
    wait_for(
        lambda: any(
            t == "Warning" and r == "ReconcileFailed" and "exceeded quota" in m
            for t, r, m in events(cluster, ns, "refused")
        ),
        what="ReconcileFailed Event",
    )

    def refused_applies() -> int:
        return sum(
            1
            for w in cluster.writes()
            if w["objectRef"].get("namespace") == ns
            and w["objectRef"].get("resource") == "services"
            and w["responseStatus"]["code"] == 403
        )

    # Retried with backoff (2, 4, 8 s ...), and the same failure is one Event, not one per retry.
    wait_for(lambda: refused_applies() >= 3, timeout=30, what="three refused applies")
    assert [r for _, r, _ in events(cluster, ns, "refused")].count("ReconcileFailed") == 1
    assert [handlers.backoff(n) for n in (0, 1, 2, 6, 50)] == [2, 4, 8, 120, 120]
    core.delete_namespaced_resource_quota("no-services", ns)
    wait_for(
        lambda: (
            condition(o := get_v4d(cluster, ns, "refused"), "Degraded").get("status") == "False"
            and o["status"]["phase"] == "Deploying"
        ),
        timeout=90,
        interval=1,
        what="converged after the quota went",
    )
    assert [s.metadata.name for s in core.list_namespaced_service(ns).items] == [ChildNames("refused").api]
