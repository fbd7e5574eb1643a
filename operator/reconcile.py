"""One reconcile of one V4Deployment: validate -> plan -> render -> apply what differs -> status.

Called by the kopf handlers for the V4Deployment itself (create/update/resume) and for every event
on a child (drift, KubeRay status). Writes only what differs from the live objects, so a converged
deployment costs no writes however often it is reconciled.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.rest import ApiException

from v4d.operator import render, status
from v4d.operator.kube import Kube
from v4d.operator.metrics import OperatorMetrics
from v4d.operator.planner import PlanError, plan
from v4d.operator.validate import SpecError
from v4d.serving.names import KIND, MANAGED_BY, ChildNames
from v4d.serving.plan import Plan


class InvalidSpec(Exception):
    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


def make_plan(name: str, spec: dict[str, Any]) -> Plan:
    """The spine's validation and planner; every problem becomes InvalidSpec naming the field."""
    try:
        return plan(spec, name=name)
    except SpecError as e:
        raise InvalidSpec("SpecInvalid", "; ".join(str(i) for i in e.issues)) from None
    except PlanError as e:
        raise InvalidSpec("PlanInfeasible", "; ".join(e.problems)) from None


def api_message(e: ApiException) -> str:
    """The apiserver's own sentence for a refused request (its Status body), else the HTTP reason."""
    try:
        return json.loads(e.body)["message"]
    except (TypeError, ValueError, KeyError):
        return f"{e.status} {e.reason}"


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Reconciler:
    kube: Kube
    metrics: OperatorMetrics
    options: render.RenderOptions = field(default_factory=render.RenderOptions)
    _locks: dict[str, threading.Lock] = field(default_factory=dict)
    _plans: dict[tuple[str, int], Plan] = field(default_factory=dict)
    _phases: dict[str, str] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def _lock(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def _plan(self, uid: str, generation: int, name: str, spec: dict[str, Any]) -> Plan:
        key = (uid, generation)
        if key not in self._plans:  # plans are deterministic: one per spec generation
            self._plans = {k: v for k, v in self._plans.items() if k[0] != uid}
            self._plans[key] = make_plan(name, spec)
        return self._plans[key]

    def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = obj["metadata"]
        ev = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": obj["apiVersion"],
                "kind": obj["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": MANAGED_BY},
            "firstTimestamp": _now(),
            "lastTimestamp": _now(),
            "count": 1,
        }
        self.kube.create_event(ev)

    def forget(self, namespace: str, name: str, uid: str) -> None:
        with self._guard:
            self._locks.pop(f"{namespace}/{name}", None)
            self._plans = {k: v for k, v in self._plans.items() if k[0] != uid}
            self._phases.pop(uid, None)
        self._publish_phases()

    def _record_phase(self, uid: str, phase: str) -> None:
        with self._guard:
            self._phases[uid] = phase
        self._publish_phases()

    def _publish_phases(self) -> None:
        counts: dict[str, int] = {}
        for phase in list(self._phases.values()):
            counts[phase] = counts.get(phase, 0) + 1
        self.metrics.set_objects(counts)

    def sync(self, namespace: str, name: str) -> str | None:
        """Reconcile V4Deployment namespace/name; returns its phase (None when it is gone).

        The object is read under the per-object lock, so a reconcile always starts from what the
        previous one wrote (no status flapping between overlapping triggers)."""
        with self._lock(f"{namespace}/{name}"):
            obj = self.kube.get(KIND, namespace, name)
            if obj is None or obj["metadata"].get("deletionTimestamp"):
                return None
            with self.metrics.reconcile():
                phase = self._sync(obj)
        self._record_phase(obj["metadata"]["uid"], phase)
        return phase

    def _sync(self, obj: dict[str, Any]) -> str:
        meta = obj["metadata"]
        name, namespace, generation = meta["name"], meta["namespace"], int(meta.get("generation", 1))
        spec = obj.get("spec") or {}
        previous = {k: v for k, v in (obj.get("status") or {}).items() if k != "kopf"}
        try:
            plan = self._plan(meta["uid"], generation, name, spec)
        except InvalidSpec as e:
            new = status.invalid_status(str(e), e.reason, generation, previous, _now())
            if self._write_status(obj, previous, new):
                self.event(obj, "Warning", e.reason, f"nothing applied: {e}")
            return new["phase"]

        children = render.render(plan, spec, {"name": name, "namespace": namespace, "uid": meta["uid"]}, self.options)
        changes = []
        for child in children:
            try:
                if change := self._apply(child):
                    changes.append(change)
            except ApiException as e:  # recorded in status, then raised so kopf retries with backoff
                what = f"{child['kind']} {child['metadata']['name']}"
                new = status.apply_failed_status(f"applying {what}: {api_message(e)}", generation, previous, _now())
                self._write_status(obj, previous, new)
                self._record_phase(meta["uid"], new["phase"])
                raise
        if changes:  # one Event per reconcile that wrote, saying what and how
            self.event(obj, "Normal", "Applied", "; ".join(changes))

        n = ChildNames(name)
        rs = self.kube.get("RayService", namespace, n.rayservice)
        cm = self.kube.get("ConfigMap", namespace, n.autoscaling)
        groups = render.layout(plan, spec, self.options)
        new = status.compute(
            name=name,
            generation=generation,
            plan=plan,
            groups=groups,
            rayservice=rs,
            autoscaling_cm=cm,
            previous=previous,
            now=_now(),
        )
        if self._write_status(obj, previous, new):
            old_phase = previous.get("phase")
            if old_phase != new["phase"]:
                self.event(obj, "Normal", f"Phase{new['phase']}", f"phase {old_phase or 'none'} -> {new['phase']}")
            limited = next(c for c in new["conditions"] if c["type"] == "CapacityLimited")
            old_limited = next((c for c in previous.get("conditions") or [] if c["type"] == "CapacityLimited"), {})
            if limited["status"] == "True" and old_limited.get("status") != "True":
                self.event(obj, "Warning", "CapacityLimited", limited["message"])
        return new["phase"]

    def _apply(self, child: dict[str, Any]) -> str | None:
        """Apply `child` unless the live object already holds it; a description of the change, if any."""
        meta = child["metadata"]
        live = self.kube.get(child["kind"], meta["namespace"], meta["name"])
        if live is not None and self.kube.holds(live, child):
            return None
        self.kube.apply(child)
        what = f"{child['kind']} {meta['name']}"
        if live is None:
            return f"created {what}"
        if child["kind"] == "RayService":
            in_place = self.kube.holds(
                live["spec"].get("rayClusterConfig"),
                child["spec"]["rayClusterConfig"],
                ignore=("replicas", "minReplicas", "maxReplicas"),
            )
            return f"updated {what} " + (
                "in place (serveConfigV2/replicas only)"
                if in_place
                else "(cluster spec changed: KubeRay rolls out a new cluster)"
            )
        return f"updated {what}"

    def _write_status(self, obj: dict[str, Any], previous: dict[str, Any], new: dict[str, Any]) -> bool:
        if previous == new:
            return False
        body = dict(new)
        for key in previous:
            if key not in new:
                body[key] = None  # merge patch: drop what no longer applies
        meta = obj["metadata"]
        try:
            self.kube.patch_status(KIND, meta["namespace"], meta["name"], body)
        except ApiException as e:
            if e.status == 404:  # deleted meanwhile: its children go by garbage collection
                return False
            raise
        return True
