"""Render a plan into the Kubernetes objects of one V4Deployment (pure: no kopf, ray or torch).

`layout(plan, spec)` turns the plan into Ray worker groups (one per pool and role) with replica
bounds; `render(...)` turns plan + layout into manifest dicts: the KubeRay `RayService`, a
ConfigMap with the plan, the API Service, the autoscaling-decisions ConfigMap with the Ray pods'
ServiceAccount/Role/RoleBinding that may write it, and a PodMonitor when Prometheus Operator
CRDs exist. Every child carries an owner reference to the V4Deployment (garbage collection does
deletion) and the same labels.

What KubeRay does with a change (see docs/operator.md): a change confined to `serveConfigV2` and
worker-group `replicas`/`minReplicas`/`maxReplicas` is applied in place to the running cluster;
any other change under `rayClusterConfig` rolls out a new cluster. So serving parameters live in
`serveConfigV2` only, and nothing derived from them reaches the pod templates.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from v4d.serving.names import (
    API_POD_LABEL,
    API_VERSION,
    APP_IMPORT_PATH,
    DEPLOYMENT_ENV,
    DEPLOYMENT_LABEL,
    KIND,
    MANAGED_BY,
    METRICS_PORT,
    POOL_LABEL,
    ROLE_LABEL,
    SERVE_PORT,
    WEIGHTS_DIR_ENV,
    ChildNames,
)
from v4d.serving.plan import Plan, PoolPlan

ROLES = ("attention", "experts")


@dataclass(frozen=True)
class RenderOptions:
    """Operator-wide settings (from CLI flags / Helm values), not per deployment."""

    images: dict[str, str] = field(
        default_factory=lambda: {"nvidia": "v4d/serving-cuda:0.1.0", "ascend": "v4d/serving-ascend:0.1.0"}
    )
    ray_version: str = "2.60.0"
    monitoring: bool = False  # the Prometheus Operator CRDs exist: render a PodMonitor
    head_cpu: str = "2"
    head_memory: str = "8Gi"


@dataclass(frozen=True)
class WorkerGroup:
    """One Ray worker group: the pods of one pool serving one role."""

    pool: str
    role: str
    vendor: str
    resource_name: str
    ray_resource: str
    devices_per_pod: int
    hosts: int  # pods per replica (numOfHosts): a replica wider than a node spans hosts
    replicas: int
    min_replicas: int
    max_replicas: int
    wanted_max_replicas: int  # before the pool's maxNodes bound; > max_replicas means capacity-limited
    image: str
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return f"{self.pool}-{self.role}"

    @property
    def capacity_limited(self) -> bool:
        return self.wanted_max_replicas > self.max_replicas


def _max_nodes(spec: dict[str, Any], pool: PoolPlan) -> int:
    """The pool's maxNodes in the live spec (it may have changed since planning), else the planned nodes."""
    for p in spec.get("pools") or []:
        if p.get("name") == pool.name and p.get("maxNodes") is not None:
            return int(p["maxNodes"])
    return pool.nodes


def layout(plan: Plan, spec: dict[str, Any], options: RenderOptions | None = None) -> list[WorkerGroup]:
    """Worker groups of the plan, in pool order then role order.

    A pod is a unit of devices the Kubernetes scheduler packs onto the pool's nodes. Expert
    shards (one device each) go in pods of up to a node's devices; they are fixed. An attention
    replica is one pod of `devices_per_replica` devices, or `hosts` whole-node pods when it is wider
    than a node. The attention group's maxReplicas is what the pool's maxNodes has left after the
    expert pods; wanting more is reported as CapacityLimited.
    """
    options = options or RenderOptions()
    engine = plan.engine
    groups: list[WorkerGroup] = []
    for pool in plan.pools:
        dpn = pool.devices_per_node
        common: dict[str, Any] = dict(
            pool=pool.name,
            vendor=pool.vendor,
            resource_name=pool.resource_name,
            ray_resource=pool.ray_resource,
            image=pool.image or options.images[pool.vendor],
            node_selector=dict(pool.node_selector),
            tolerations=list(pool.tolerations),
        )
        shards = sum(1 for s in plan.shards if s.pool == pool.name)
        expert_pods = math.ceil(shards / dpn)
        per_pod = math.ceil(shards / expert_pods) if shards else 0  # shards spread evenly over pods
        if "experts" in pool.roles and shards:
            groups.append(
                WorkerGroup(
                    role="experts",
                    devices_per_pod=per_pod,
                    hosts=1,
                    replicas=expert_pods,
                    min_replicas=expert_pods,
                    max_replicas=expert_pods,
                    wanted_max_replicas=expert_pods,
                    **common,
                )
            )
        if "attention" in pool.roles and engine.pool == pool.name:
            dpr = engine.devices_per_replica
            hosts = math.ceil(dpr / dpn)
            # Devices left on each node once the expert pods are packed (k to a node).
            k = dpn // per_pod if per_pod else 0
            left = [dpn - k * per_pod] * (expert_pods // k) if k else []
            if k and expert_pods % k:
                left.append(dpn - (expert_pods % k) * per_pod)
            free_nodes = max(_max_nodes(spec, pool) - len(left), 0)
            if dpr >= dpn:
                fit = free_nodes // hosts
            else:
                fit = free_nodes * (dpn // dpr) + sum(n // dpr for n in left)
            wanted = engine.max_replicas
            maximum = min(wanted, fit)
            minimum = min(engine.min_replicas, maximum)
            replicas = min(max(engine.replicas, minimum), maximum)
            groups.append(
                WorkerGroup(
                    role="attention",
                    devices_per_pod=min(dpr, dpn),
                    hosts=hosts,
                    replicas=replicas,
                    min_replicas=minimum,
                    max_replicas=maximum,
                    wanted_max_replicas=wanted,
                    **common,
                )
            )
    groups.sort(key=lambda g: (g.pool, ROLES.index(g.role)))
    return groups


def labels(name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "v4d",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        DEPLOYMENT_LABEL: name,
    }


def owner_reference(meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(meta: dict[str, Any], name: str, extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": meta["namespace"],
        "labels": {**labels(meta["name"]), **(extra_labels or {})},
        "ownerReferences": [owner_reference(meta)],
    }


def serve_config(plan: Plan) -> str:
    """`serveConfigV2`: one Serve application built by the frontend's builder from the plan."""
    app = {
        "name": plan.name,
        "route_prefix": "/",
        "import_path": APP_IMPORT_PATH,
        "args": {"plan": plan.to_dict()},
    }
    config = {"http_options": {"host": "0.0.0.0", "port": SERVE_PORT}, "applications": [app]}
    # Flow style for leaf lists keeps the slot maps one line per layer (V4-Pro: ~40% smaller).
    return yaml.safe_dump(config, sort_keys=True, default_flow_style=None, width=1 << 16)


PodShared = tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]  # volumes, mounts, env


def _weights_volume(uri: str) -> PodShared:
    """Volumes, mounts and env for the weights URI: pvc://CLAIM/PATH and hostpath:///DIR are
    mounted read-only at /mnt/v4d/weights; file:// (in the image) and remote schemes need none."""
    mount = "/mnt/v4d/weights"
    if uri.startswith("pvc://"):
        claim, _, sub = uri[len("pvc://") :].partition("/")
        volumes = [{"name": "weights", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}]
        path = f"{mount}/{sub}".rstrip("/")
    elif uri.startswith("hostpath://"):
        volumes = [{"name": "weights", "hostPath": {"path": uri[len("hostpath://") :], "type": "Directory"}}]
        path = mount
    else:
        return [], [], []
    return (
        volumes,
        [{"name": "weights", "mountPath": mount, "readOnly": True}],
        [{"name": WEIGHTS_DIR_ENV, "value": path}],
    )


def _api_key_env(plan: Plan) -> list[dict[str, Any]]:
    """spec.serving.apiKeySecretRef as the env var the ingress reads its key from (a missing Secret
    keeps the pods from starting: no unauthenticated fallback)."""
    ref = plan.serving.api_key_secret
    if not ref:
        return []
    secret = {"name": ref["name"], "key": ref["key"]}
    return [{"name": plan.serving.api_key_env, "valueFrom": {"secretKeyRef": secret}}]


def _env(name: str, role: str, pool: str = "", vendor: str = "") -> list[dict[str, str]]:
    values = {DEPLOYMENT_ENV: name, "V4D_ROLE": role, "V4D_POOL": pool, "V4D_VENDOR": vendor}
    return [{"name": k, "value": v} for k, v in values.items() if v]


def _worker_group(meta: dict[str, Any], g: WorkerGroup, shared: PodShared) -> dict[str, Any]:
    volumes, mounts, shared_env = shared
    devices = str(g.devices_per_pod)
    start: dict[str, str] = {}
    if g.ray_resource == "NPU":
        # KubeRay derives num-gpus from a *gpu limit but knows no Ascend resource: declare NPU to Ray.
        start["resources"] = json.dumps(json.dumps({"NPU": g.devices_per_pod}))
    container = {
        "name": "ray-worker",
        "image": g.image,
        "resources": {"limits": {g.resource_name: devices}, "requests": {g.resource_name: devices}},
        "env": _env(meta["name"], g.role, g.pool, g.vendor) + shared_env,
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT}],
    }
    if mounts:
        container["volumeMounts"] = mounts
    pod: dict[str, Any] = {"serviceAccountName": ChildNames(meta["name"]).ray_account, "containers": [container]}
    if g.node_selector:
        pod["nodeSelector"] = g.node_selector
    if g.tolerations:
        pod["tolerations"] = g.tolerations
    if volumes:
        pod["volumes"] = volumes
    return {
        "groupName": g.name,
        "replicas": g.replicas,
        "minReplicas": g.min_replicas,
        "maxReplicas": g.max_replicas,
        "numOfHosts": g.hosts,
        "rayStartParams": start,
        # Ray node labels (KubeRay >= 1.5 passes them to `ray start --labels`): shards and engines
        # are placed with label selectors on these, the same labels `v4d serve` gives local nodes.
        "labels": {POOL_LABEL: g.pool, ROLE_LABEL: g.role},
        "template": {
            "metadata": {"labels": {**labels(meta["name"]), POOL_LABEL: g.pool, ROLE_LABEL: g.role}},
            "spec": pod,
        },
    }


def rayservice(plan: Plan, meta: dict[str, Any], groups: list[WorkerGroup], options: RenderOptions) -> dict[str, Any]:
    # what every Ray pod gets alike: the app's builder runs on one, its replicas on any
    volumes, mounts, weights_env = _weights_volume(plan.weights_uri)
    shared_env = weights_env + _api_key_env(plan)
    engine = plan.engine
    autoscaling = engine.max_replicas > engine.min_replicas
    head_image = next(
        (g.image for g in groups if g.role == "attention"),
        groups[0].image if groups else next(iter(options.images.values())),
    )
    head_container: dict[str, Any] = {
        "name": "ray-head",
        "image": head_image,
        "resources": {
            "requests": {"cpu": options.head_cpu, "memory": options.head_memory},
            "limits": {"cpu": options.head_cpu, "memory": options.head_memory},
        },
        "env": _env(meta["name"], "head") + shared_env,
        "ports": [
            {"name": "gcs", "containerPort": 6379},
            {"name": "dashboard", "containerPort": 8265},
            {"name": "client", "containerPort": 10001},
            {"name": "serve", "containerPort": SERVE_PORT},
            {"name": "metrics", "containerPort": METRICS_PORT},
        ],
    }
    if mounts:
        head_container["volumeMounts"] = mounts
    head_pod: dict[str, Any] = {
        "serviceAccountName": ChildNames(meta["name"]).ray_account,
        "containers": [head_container],
    }
    if volumes:
        head_pod["volumes"] = volumes
    cluster: dict[str, Any] = {
        "rayVersion": options.ray_version,
        "enableInTreeAutoscaling": autoscaling,
        "headGroupSpec": {
            # The head runs the Serve controller and the HTTP ingress, no accelerator work.
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"},
            "template": {
                "metadata": {"labels": {**labels(meta["name"]), ROLE_LABEL: "head", API_POD_LABEL: "true"}},
                "spec": head_pod,
            },
        },
        "workerGroupSpecs": [_worker_group(meta, g, (volumes, mounts, shared_env)) for g in groups],
    }
    if autoscaling:
        cluster["autoscalerOptions"] = {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": int(engine.downscale_delay_s),
        }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _metadata(meta, ChildNames(meta["name"]).rayservice),
        "spec": {"serveConfigV2": serve_config(plan), "rayClusterConfig": cluster},
    }


def plan_configmap(plan: Plan, meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(meta, ChildNames(meta["name"]).plan),
        "data": {"plan.json": json.dumps(plan.to_dict(), sort_keys=True, separators=(",", ":"))},
    }


def api_service(plan: Plan, meta: dict[str, Any]) -> dict[str, Any]:
    """The API endpoint: the head pods whose Serve proxy KubeRay marks healthy (`ray.io/serve`)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(meta, ChildNames(meta["name"]).api),
        "spec": {
            "type": "ClusterIP",
            "selector": {DEPLOYMENT_LABEL: meta["name"], API_POD_LABEL: "true", "ray.io/serve": "true"},
            "ports": [
                {"name": "http", "port": plan.serving.port, "targetPort": SERVE_PORT, "protocol": "TCP"},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT, "protocol": "TCP"},
            ],
        },
    }


def autoscaling_objects(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The ConfigMap the Serve app's autoscaling publisher writes decisions to (the operator only
    owns its metadata), and the Ray pods' account allowed to get/patch exactly that ConfigMap."""
    n = ChildNames(meta["name"])
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(meta, n.autoscaling)}
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(meta, n.ray_account)}
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(meta, n.ray_account),
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": [n.autoscaling],
                "verbs": ["get", "patch"],
            }
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(meta, n.ray_account),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": n.ray_account},
        "subjects": [{"kind": "ServiceAccount", "name": n.ray_account, "namespace": meta["namespace"]}],
    }
    return [cm, account, role, binding]


def pod_monitor(meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _metadata(meta, ChildNames(meta["name"]).podmonitor),
        "spec": {
            "selector": {"matchLabels": {DEPLOYMENT_LABEL: meta["name"]}},
            "podMetricsEndpoints": [{"port": "metrics", "interval": "15s"}],
        },
    }


def render(
    plan: Plan, spec: dict[str, Any], meta: dict[str, Any], options: RenderOptions | None = None
) -> list[dict[str, Any]]:
    """All children of one V4Deployment. `meta` needs name, namespace and uid."""
    options = options or RenderOptions()
    groups = layout(plan, spec, options)
    children = [
        plan_configmap(plan, meta),
        *autoscaling_objects(meta),
        rayservice(plan, meta, groups, options),
        api_service(plan, meta),
    ]
    if options.monitoring:
        children.append(pod_monitor(meta))
    return children
