"""Rendering without a cluster: worker groups, resources, serve config, what changes what, capacity bounds."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers.opspecs import sample, tiny_spec

from v4d.operator import render, status
from v4d.operator.kube import contains
from v4d.operator.planner import plan
from v4d.serving.names import WEIGHTS_DIR_ENV
from v4d.serving.plan import Plan, WeightsNotHere, weights_dir

META = {"name": "demo", "namespace": "ns1", "uid": "1234-uid"}


def _rendered(spec, options=None):
    p = plan(spec, name=META["name"])
    children = render.render(p, spec, META, options)
    return p, {(c["kind"], c["metadata"]["name"]): c for c in children}


def _devices(g):
    (count,) = g["template"]["spec"]["containers"][0]["resources"]["limits"].values()
    return int(count)


def _groups(rs):
    return {g["groupName"]: g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


@pytest.fixture(scope="module")
def pro():
    doc = sample("v4-pro-h200-ascend.yaml")
    return doc["spec"], *_rendered(doc["spec"])


def test_pro_worker_groups_resources_and_placement(pro):
    spec, p, objs = pro
    rs = objs[("RayService", "demo")]
    groups = _groups(rs)
    assert set(groups) == {"h200-attention", "h200-experts", "ascend-experts"}
    pools = {s["name"]: s for s in spec["pools"]}
    for name, g in groups.items():
        pool, role = name.split("-")
        container = g["template"]["spec"]["containers"][0]
        limits = container["resources"]["limits"]
        assert g["labels"] == {"v4d.dev/pool": pool, "v4d.dev/role": role}  # Ray node labels for placement
        assert "labels" not in g["rayStartParams"]  # KubeRay >= 1.5 rejects rayStartParams.labels
        assert g["template"]["spec"]["nodeSelector"] == pools[pool]["nodeSelector"]
        assert g["template"]["spec"]["tolerations"] == pools[pool]["tolerations"]
        if pool == "ascend":
            assert list(limits) == ["huawei.com/Ascend910"]
            npu = json.loads(json.loads(g["rayStartParams"]["resources"]))
            assert npu == {"NPU": int(limits["huawei.com/Ascend910"])}
            assert container["image"] == pools["ascend"]["image"]
        else:
            assert list(limits) == ["nvidia.com/gpu"] and "resources" not in g["rayStartParams"]
            assert container["image"] == render.RenderOptions().images["nvidia"]
    # Every expert shard has a device: pods x devices per pod cover the pool's shards.
    for pool in ("h200", "ascend"):
        shards = sum(1 for s in p.shards if s.pool == pool)
        g = groups[f"{pool}-experts"]
        assert g["replicas"] * _devices(g) >= shards
    # At maxReplicas the groups of a pool fit in its maxNodes.
    for pool in pools.values():
        used = sum(
            g["maxReplicas"] * g["numOfHosts"] * _devices(g)
            for n, g in groups.items()
            if n.startswith(pool["name"] + "-")
        )
        assert used <= pool["maxNodes"] * pool["devicesPerNode"]


def test_serve_config_carries_the_plan(pro):
    _, p, objs = pro
    config = yaml.safe_load(objs[("RayService", "demo")]["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    assert app["import_path"] == "v4d.serving.app:app_builder"
    assert Plan.from_dict(app["args"]["plan"]) == p
    assert Plan.from_json(objs[("ConfigMap", "demo-plan")]["data"]["plan.json"]) == p


def test_children_are_owned_and_labelled(pro):
    _, _, objs = pro
    assert {k for k, _ in objs} == {"RayService", "ConfigMap", "Service", "ServiceAccount", "Role", "RoleBinding"}
    for obj in objs.values():
        meta = obj["metadata"]
        assert meta["namespace"] == "ns1" and meta["labels"]["v4d.dev/deployment"] == "demo"
        (ref,) = meta["ownerReferences"]
        assert ref["uid"] == "1234-uid" and ref["kind"] == "V4Deployment" and ref["controller"] is True
    rules = objs[("Role", "demo-ray")]["rules"]
    assert rules == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["demo-autoscaling"],
            "verbs": ["get", "patch"],
        }
    ]


def test_podmonitor_only_with_prometheus_operator():
    _, objs = _rendered(tiny_spec(), render.RenderOptions(monitoring=True))
    assert objs[("PodMonitor", "demo")]["spec"]["selector"]["matchLabels"] == {"v4d.dev/deployment": "demo"}
    _, objs = _rendered(tiny_spec())
    assert not any(k == "PodMonitor" for k, _ in objs)


def test_weights_volume_from_pvc_uri():
    p, objs = _rendered(tiny_spec())
    rs = objs[("RayService", "demo")]
    pods = [g["template"]["spec"] for g in _groups(rs).values()] + [
        rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    ]
    for pod in pods:  # every Ray pod: the app's builder runs on one, the replicas on the others
        assert pod["volumes"] == [
            {"name": "weights", "persistentVolumeClaim": {"claimName": "tiny-weights", "readOnly": True}}
        ]
        (container,) = pod["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env[WEIGHTS_DIR_ENV] == "/mnt/v4d/weights/ckpt"
        # the Serve app reads the checkpoint where the pod mounts it, not at the URI's text
        assert weights_dir(p.weights_uri, env[WEIGHTS_DIR_ENV]) == "/mnt/v4d/weights/ckpt"
        assert container["volumeMounts"] == [{"name": "weights", "mountPath": "/mnt/v4d/weights", "readOnly": True}]
    with pytest.raises(WeightsNotHere, match="spec.model.weights.uri: 'pvc://tiny-weights/ckpt' is mounted only"):
        weights_dir(p.weights_uri, None)  # outside the pods (`v4d serve`)


@pytest.mark.parametrize(
    ("uri", "mounted", "expected"),
    [
        ("/home/me/ckpt", None, "/home/me/ckpt"),  # the random checkpoint `v4d serve` makes
        ("file:///models/v4", None, "/models/v4"),
        ("file:///models/v4", "/mnt/v4d/weights", "/models/v4"),  # in the image: nothing mounted for it
        ("hostpath:///data/v4", "/mnt/v4d/weights", "/mnt/v4d/weights"),
        ("hostpath:///data/v4", None, "/data/v4"),  # `v4d serve` on that host
        ("pvc://claim/sub/dir", "/mnt/v4d/weights/sub/dir", "/mnt/v4d/weights/sub/dir"),
    ],
)
def test_weights_dir_of_each_uri(uri, mounted, expected):
    assert weights_dir(uri, mounted) == expected


def _cluster_without_replicas(rs):
    return json.dumps(rs["spec"]["rayClusterConfig"], sort_keys=True), [
        {k: g[k] for k in ("replicas", "minReplicas", "maxReplicas")}
        for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    ]


@pytest.mark.parametrize(
    "change, in_place",
    [
        ({"serving": {**tiny_spec()["serving"], "maxQueue": 7}}, True),
        ({"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 2, "targetKVCacheUtilization": 0.5}}, True),
        ({"replicas": 2}, True),
        ({"autoscaling": {**tiny_spec()["autoscaling"], "timeToReadySeconds": 600}}, True),
        ({"model": {**tiny_spec()["model"], "servedName": "other"}}, True),
        ({"pools": [{**tiny_spec()["pools"][0], "nodeSelector": {"zone": "b"}}, tiny_spec()["pools"][1]]}, False),
        ({"pools": [tiny_spec()["pools"][0], {**tiny_spec()["pools"][1], "image": "custom:1"}]}, False),
    ],
)
def test_which_changes_stay_in_place(change, in_place):
    """KubeRay upgrades the Serve app in place when only serveConfigV2 and worker-group replica
    counts change; anything else in rayClusterConfig rolls out a new cluster (docs/operator.md)."""
    _, before = _rendered(tiny_spec())
    _, after = _rendered(tiny_spec(**change))
    old, new = before[("RayService", "demo")], after[("RayService", "demo")]
    ignore = frozenset({"replicas", "minReplicas", "maxReplicas"})
    same_cluster = contains(old["spec"]["rayClusterConfig"], new["spec"]["rayClusterConfig"], ignore) and contains(
        new["spec"]["rayClusterConfig"], old["spec"]["rayClusterConfig"], ignore
    )
    assert same_cluster is in_place
    if in_place:
        assert old["spec"] != new["spec"]  # something did change: the serve config or the replica counts


def test_capacity_limited_when_max_replicas_exceed_max_nodes():
    """The planner sizes pools by device counts; the layout bounds pods per node. Here the pool has
    shrunk to one node since planning (4 devices, 1 taken by the expert shard): 3 of 7 fit."""
    spec = tiny_spec(autoscaling={"enabled": True, "minReplicas": 1, "maxReplicas": 7}, replicas=1)
    p = plan(spec, name="demo")
    shrunk = tiny_spec(pools=[{**spec["pools"][0], "maxNodes": 1}, spec["pools"][1]])
    groups = render.layout(p, shrunk)
    att = next(g for g in groups if g.role == "attention")
    assert (att.max_replicas, att.wanted_max_replicas, att.capacity_limited) == (3, 7, True)
    assert not any(g.capacity_limited for g in render.layout(p, spec))
    st = status.compute(
        name="demo",
        generation=3,
        plan=p,
        groups=groups,
        rayservice=None,
        autoscaling_cm=None,
        previous={},
        now="2026-01-01T00:00:00Z",
    )
    cond = {c["type"]: c for c in st["conditions"]}
    assert cond["CapacityLimited"]["status"] == "True" and "7 wanted, 3 fit" in cond["CapacityLimited"]["message"]
    assert st["phase"] == "Deploying" and st["observedGeneration"] == 3


def test_contains_ignores_server_defaults_but_sees_drift():
    want = {"a": {"b": [1, {"c": "x"}]}, "d": "e"}
    assert contains({"a": {"b": [1, {"c": "x", "default": 0}]}, "d": "e", "extra": 1}, want)
    assert not contains({"a": {"b": [1, {"c": "y"}]}, "d": "e"}, want)
    assert not contains({"a": {"b": [1]}, "d": "e"}, want)


def test_api_key_from_the_secret_in_every_ray_pod():
    ref = {"name": "v4d-api-key", "key": "token"}
    p, objs = _rendered(tiny_spec(serving={**tiny_spec()["serving"], "apiKeySecretRef": ref}))
    rs = objs[("RayService", "demo")]
    cluster = rs["spec"]["rayClusterConfig"]
    for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        env = {e["name"]: e for e in g["template"]["spec"]["containers"][0]["env"]}
        assert env[p.serving.api_key_env] == {"name": "V4D_API_KEY", "valueFrom": {"secretKeyRef": ref}}
    _, objs = _rendered(tiny_spec())  # no key: no such env (every request accepted, as documented)
    pods = objs[("RayService", "demo")]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert not any(e["name"] == "V4D_API_KEY" for g in pods for e in g["template"]["spec"]["containers"][0]["env"])
