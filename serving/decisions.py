"""The autoscaling-decisions ConfigMap (`<deployment>-autoscaling`): one schema for writer and reader.

Under KubeRay the engine autoscaling policy's publisher (`v4d.serving.decision_publish`) writes it;
the operator (`v4d.operator.status`) reads it into `status.scalingHistory` and
`status.kvCacheUtilization`. Two data keys:

- `decisions.json`: JSON list, newest last, of `{time (RFC 3339), from, to, reason,
  kvCacheUtilization, waitingRequests}` (the CRD's `status.scalingHistory[]` item);
- `state.json`: `{"targetReplicas": int, "kvCacheUtilization": float 0-1}` after the last decision.

Pure (stdlib only). The reader tolerates what it cannot parse: a malformed ConfigMap shows no history
rather than failing the reconcile.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from v4d.serving.names import STATUS_SCALING_HISTORY

DECISIONS_KEY = "decisions.json"
STATE_KEY = "state.json"


@dataclass(frozen=True)
class ScalingRecord:
    """One engine scaling decision as `status.scalingHistory[]` shows it."""

    time: str  # RFC 3339, UTC
    from_: int
    to: int
    reason: str  # KVPressureHigh, KVPressureLow, ...
    kv_cache_utilization: float | None = None
    waiting_requests: int | None = None

    @classmethod
    def from_decision(cls, decision: dict[str, Any]) -> ScalingRecord:
        """A KV-pressure policy decision (`v4d.serving.autoscale`: time in epoch seconds, from, to,
        kv_mean, waiting)."""
        return cls(
            time=datetime.fromtimestamp(decision["time"], UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            from_=decision["from"],
            to=decision["to"],
            reason="KVPressureHigh" if decision["to"] > decision["from"] else "KVPressureLow",
            kv_cache_utilization=decision["kv_mean"],
            waiting_requests=int(decision["waiting"]),
        )

    def to_json(self) -> dict[str, Any]:
        """The CRD's camelCase item; absent figures are left out."""
        out: dict[str, Any] = {"time": self.time, "from": self.from_, "to": self.to, "reason": self.reason}
        if self.kv_cache_utilization is not None:
            out["kvCacheUtilization"] = self.kv_cache_utilization
        if self.waiting_requests is not None:
            out["waitingRequests"] = self.waiting_requests
        return out

    @classmethod
    def from_json(cls, d: Any) -> ScalingRecord | None:
        """The item back, or None when it is not one (wrong types, missing keys)."""
        if not isinstance(d, dict):
            return None
        time, frm, to, reason = d.get("time"), d.get("from"), d.get("to"), d.get("reason")
        if not (isinstance(time, str) and isinstance(reason, str) and isinstance(frm, int) and isinstance(to, int)):
            return None
        kv, waiting = d.get("kvCacheUtilization"), d.get("waitingRequests")
        return cls(
            time,
            frm,
            to,
            reason,
            float(kv) if isinstance(kv, int | float) else None,
            waiting if isinstance(waiting, int) else None,
        )


@dataclass(frozen=True)
class DecisionsConfigMap:
    """The ConfigMap's data: the newest decisions (at most STATUS_SCALING_HISTORY), the state after them."""

    decisions: list[ScalingRecord] = field(default_factory=list)
    target_replicas: int | None = None
    kv_cache_utilization: float | None = None

    @classmethod
    def from_decisions(cls, decisions: list[dict[str, Any]]) -> DecisionsConfigMap:
        """From the KV-pressure policy's decisions, oldest first (at least one)."""
        last = decisions[-1]
        return cls(
            [ScalingRecord.from_decision(d) for d in decisions[-STATUS_SCALING_HISTORY:]],
            target_replicas=last["to"],
            kv_cache_utilization=last["kv_mean"],
        )

    def to_data(self) -> dict[str, str]:
        state: dict[str, Any] = {}
        if self.target_replicas is not None:
            state["targetReplicas"] = self.target_replicas
        if self.kv_cache_utilization is not None:
            state["kvCacheUtilization"] = self.kv_cache_utilization
        return {
            DECISIONS_KEY: json.dumps([r.to_json() for r in self.decisions[-STATUS_SCALING_HISTORY:]]),
            STATE_KEY: json.dumps(state),
        }

    @classmethod
    def from_data(cls, data: dict[str, str] | None) -> DecisionsConfigMap:
        """Read the ConfigMap's `data`; what is malformed is ignored (an empty view at worst)."""
        data = data or {}
        try:
            decisions = json.loads(data.get(DECISIONS_KEY) or "[]")
            state = json.loads(data.get(STATE_KEY) or "{}")
        except json.JSONDecodeError:
            return cls()
        if not isinstance(decisions, list) or not isinstance(state, dict):
            return cls()
        records = [r for r in map(ScalingRecord.from_json, decisions) if r is not None]
        target, kv = state.get("targetReplicas"), state.get("kvCacheUtilization")
        return cls(
            records[-STATUS_SCALING_HISTORY:],
            target if isinstance(target, int) else None,
            float(kv) if isinstance(kv, int | float) else None,
        )
