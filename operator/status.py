"""V4Deployment status from the plan, the worker layout and the RayService status (pure).

Conditions follow `metav1.Condition` (type, status, reason, message, lastTransitionTime,
observedGeneration); a condition keeps its lastTransitionTime while its status stays the same, so
recomputing an unchanged status gives an identical dict and the operator writes nothing. The
condition types are `api.CONDITIONS` (the CRD's enum and the README table are generated from it).
"""

from __future__ import annotations

from typing import Any

from v4d.operator import planner
from v4d.operator.api import CONDITIONS
from v4d.operator.render import WorkerGroup
from v4d.serving.decisions import DecisionsConfigMap
from v4d.serving.names import DEPLOYMENT_LABEL, ENGINE_DEPLOYMENT, ROLE_LABEL, SHARD_PREFIX
from v4d.serving.plan import Plan


def plan_summary(plan: Plan) -> dict[str, Any]:
    """`status.plan` (api.PlanSummary): devices per pool, expert slots, KV token capacity per replica."""
    return planner.summary(plan).model_dump(mode="json")


def _condition(
    type_: str, ok: bool, reason: str, message: str, generation: int, previous: dict[str, dict[str, Any]], now: str
) -> dict[str, Any]:
    status = "True" if ok else "False"
    old = previous.get(type_)
    since = old["lastTransitionTime"] if old and old.get("status") == status else now
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }


def _rs_condition(rs_status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in rs_status.get("conditions") or [] if c.get("type") == type_), None)


def _serve_deployments(rs_status: dict[str, Any]) -> dict[str, str]:
    """Serve deployment name -> status (HEALTHY, UPDATING, UNHEALTHY) of the active cluster."""
    apps = (rs_status.get("activeServiceStatus") or {}).get("applicationStatuses") or {}
    out: dict[str, str] = {}
    for app in apps.values():
        for name, dep in (app.get("serveDeploymentStatuses") or {}).items():
            out[name] = dep.get("status", "")
    return out


def _app_statuses(rs_status: dict[str, Any]) -> list[str]:
    apps = (rs_status.get("activeServiceStatus") or {}).get("applicationStatuses") or {}
    return [a.get("status", "") for a in apps.values()]


def role_of(deployment: str) -> str | None:
    """Which role a Serve deployment of our app plays: shards are `experts-<pool>-<i>` (the plan's
    shard names); engines have `engine` in their name; the ingress has no role."""
    if deployment.startswith(SHARD_PREFIX):
        return "experts"
    if ENGINE_DEPLOYMENT in deployment.lower():
        return "attention"
    return None


def roles(plan: Plan, rs_status: dict[str, Any], target_replicas: int | None) -> dict[str, dict[str, int]]:
    """Desired/ready per role. Attention: the engine replicas (the autoscaler's target when it
    published one), ready when the engine deployment is HEALTHY. Experts: one per planned shard,
    each ready when its shard deployment is HEALTHY."""
    deps = _serve_deployments(rs_status)
    desired_att = target_replicas if target_replicas is not None else plan.engine.replicas
    engines = [s for d, s in deps.items() if role_of(d) == "attention"]
    ready_att = desired_att if engines and all(s == "HEALTHY" for s in engines) else 0
    shard_names = {s.name for s in plan.shards}
    ready_exp = sum(1 for d, s in deps.items() if d in shard_names and s == "HEALTHY")
    return {
        "attention": {"desired": desired_att, "ready": ready_att},
        "experts": {"desired": len(shard_names), "ready": ready_exp},
    }


def autoscaling_view(cm: dict[str, Any] | None) -> DecisionsConfigMap:
    """What the Serve app's autoscaling publisher wrote to the `<name>-autoscaling` ConfigMap
    (malformed data is ignored, not fatal)."""
    return DecisionsConfigMap.from_data((cm or {}).get("data"))


def _override(
    previous: dict[str, Any], phase: str, generation: int, now: str, reason: str, message: str, set_to: dict[str, bool]
) -> dict[str, Any]:
    """`previous` with phase `phase` and the conditions in `set_to` set (one reason and message); the
    other conditions and the rest of the status stay. Conditions keep the CONDITIONS order."""
    prev = {c["type"]: c for c in previous.get("conditions") or []}
    conds = [
        _condition(t, set_to[t], reason, message, generation, prev, now) if t in set_to else prev[t]
        for t in CONDITIONS
        if t in set_to or t in prev
    ]
    return {
        **{k: v for k, v in previous.items() if k != "kopf"},
        "phase": phase,
        "observedGeneration": generation,
        "conditions": conds,
    }


def invalid_status(message: str, reason: str, generation: int, previous: dict[str, Any], now: str) -> dict[str, Any]:
    """Status of a spec that cannot be planned: nothing is applied, the rest of the status stays."""
    return _override(previous, "Failed", generation, now, reason, message, {"Invalid": True, "Planned": False})


def apply_failed_status(message: str, generation: int, previous: dict[str, Any], now: str) -> dict[str, Any]:
    """Status when the apiserver refused a child (quota, RBAC, an admission webhook): Degraded with the
    apiserver's words; the rest of the status stays, and the operator retries with backoff."""
    return _override(previous, "Degraded", generation, now, "ApplyFailed", message, {"Degraded": True})


def compute(
    *,
    name: str,
    generation: int,
    plan: Plan,
    groups: list[WorkerGroup],
    rayservice: dict[str, Any] | None,
    autoscaling_cm: dict[str, Any] | None,
    previous: dict[str, Any],
    now: str,
) -> dict[str, Any]:
    prev = {c["type"]: c for c in previous.get("conditions") or []}
    rs_status = (rayservice or {}).get("status") or {}
    scaling = autoscaling_view(autoscaling_cm)
    per_role = roles(plan, rs_status, scaling.target_replicas)
    summary = plan_summary(plan)

    limited = [g for g in groups if g.capacity_limited]
    limit_msg = (
        "; ".join(
            f"pool {g.pool}: {g.role} maxReplicas {g.wanted_max_replicas} wanted, {g.max_replicas} fit in maxNodes"
            for g in limited
        )
        or "every group's bounds fit its pool's maxNodes"
    )

    rs_ready = _rs_condition(rs_status, "Ready")
    upgrading = _rs_condition(rs_status, "UpgradeInProgress")
    rs_gen_seen = rs_status.get("observedGeneration", 0) >= ((rayservice or {}).get("metadata") or {}).get(
        "generation", 1
    )
    apps = _app_statuses(rs_status)
    all_ready = all(r["ready"] >= r["desired"] for r in per_role.values())
    ready = bool(rs_ready and rs_ready.get("status") == "True" and all_ready and rs_gen_seen)
    unhealthy = [d for d, s in _serve_deployments(rs_status).items() if s == "UNHEALTHY"]
    failed_apps = [s for s in apps if s in ("DEPLOY_FAILED", "UNHEALTHY")]
    degraded = bool(unhealthy or failed_apps)
    progressing = not ready and not degraded or bool(upgrading and upgrading.get("status") == "True")

    if rayservice is None:
        ready_reason, ready_msg = "RayServiceMissing", "the RayService has not been created yet"
    elif ready:
        ready_reason, ready_msg = "AllReplicasReady", "every role has its desired replicas ready"
    elif rs_ready is None:
        ready_reason, ready_msg = "WaitingForKubeRay", "KubeRay has not reported the RayService status yet"
    else:
        ready_reason = "ReplicasNotReady"
        ready_msg = ", ".join(f"{r}: {v['ready']}/{v['desired']} ready" for r, v in per_role.items())
    if upgrading and upgrading.get("status") == "True":
        prog_reason, prog_msg = "UpgradeInProgress", upgrading.get("message") or "KubeRay is upgrading the cluster"
    elif progressing:
        prog_reason, prog_msg = "Deploying", "waiting for the Ray cluster and the Serve application"
    else:
        prog_reason, prog_msg = "Stable", "nothing in progress"
    if degraded:
        deg_reason = "ServeDeploymentUnhealthy" if unhealthy else "ApplicationFailed"
        deg_msg = "unhealthy: " + ", ".join(unhealthy or failed_apps)
    else:
        deg_reason, deg_msg = "Healthy", "no unhealthy Serve deployments"

    conds = [
        _condition("Invalid", False, "SpecValid", "the spec is valid", generation, prev, now),
        _condition(
            "Planned",
            True,
            "PlanReady",
            f"{summary['expertSlots']} expert slots on {summary['expertShards']} devices; "
            f"{summary['tokenCapacityPerReplica']} tokens of KV per replica",
            generation,
            prev,
            now,
        ),
        _condition(
            "CapacityLimited",
            bool(limited),
            "MaxNodesBound" if limited else "WithinMaxNodes",
            limit_msg,
            generation,
            prev,
            now,
        ),
        _condition("Progressing", progressing, prog_reason, prog_msg, generation, prev, now),
        _condition("Ready", ready, ready_reason, ready_msg, generation, prev, now),
        _condition("Degraded", degraded, deg_reason, deg_msg, generation, prev, now),
    ]
    phase = "Ready" if ready else "Degraded" if degraded else "Deploying"
    status: dict[str, Any] = {
        "phase": phase,
        "observedGeneration": generation,
        "conditions": conds,
        "plan": summary,
        "replicas": per_role,
        "selector": f"{DEPLOYMENT_LABEL}={name},{ROLE_LABEL}=attention",
    }
    if scaling.decisions:
        status["scalingHistory"] = [r.to_json() for r in scaling.decisions]
    if scaling.kv_cache_utilization is not None:
        status["kvCacheUtilization"] = round(scaling.kv_cache_utilization, 4)
    return status
