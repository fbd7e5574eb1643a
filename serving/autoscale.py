"""Autoscaling policies for Serve (`AutoscalingConfig.policy`): engines on KV pressure, shards on load.

Serve calls a policy every control-loop tick with an `AutoscalingContext` and applies its answer. Both
policies here keep their own stabilization windows in `policy_state` (so they are plain functions of
their inputs, testable without Serve) and are deployed with Serve's own delays set to 0. A policy
decides (`decide`: no side effects); every change of target, with the figures that drove it, is then
handed to a `DecisionPublisher` (`v4d.serving.decision_publish`: Ray's internal KV, and under KubeRay
the `<deployment>-autoscaling` ConfigMap for the operator).

Engines: desired = max(ceil(current * max_kv / target_kv), ceil(total_waiting / target_waiting)),
using the hottest replica's KV utilization (a mean hides a saturated rank). With a time-to-ready,
max_kv is projected forward along its rising trend (least squares over the last TREND_WINDOW_S at
the current replica count), so a replica is asked for while the one that is coming can still arrive
before saturation rather than after it. Shards: desired =
ceil(total expert tokens/s / target_tokens_per_s). Scale up after `upscale_delay_s` of consistent
demand, down after `downscale_delay_s`, to the largest target seen while waiting to go down.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from v4d.serving.decision_publish import DecisionPublisher

KV_UTILIZATION = "kv_cache_utilization"
NUM_WAITING = "num_waiting"
NUM_RUNNING = "num_running"
EXPERT_TOKENS_PER_S = "expert_tokens_per_s"
TREND_WINDOW_S = 60.0  # KV samples the look-ahead fits its slope to


def stabilize(
    state: dict[str, Any], now: float, current: int, desired: int, upscale_delay_s: float, downscale_delay_s: float
) -> tuple[int, dict[str, Any]]:
    """Hold `current` until `desired` has pointed the same way for the direction's delay.

    `state` carries the pending direction, since when, and (going down) the largest target asked
    for meanwhile. Returns the target to apply now and the new state.
    """
    direction = "up" if desired > current else "down" if desired < current else None
    if direction is None:
        return current, {}
    if state.get("direction") != direction:
        state = {"direction": direction, "since": now, "peak": desired}
    peak = max(state["peak"], desired) if direction == "down" else desired
    state = {**state, "peak": peak}
    delay = upscale_delay_s if direction == "up" else downscale_delay_s
    if now - state["since"] + 1e-6 >= delay:
        return peak, {}
    return current, state


def kv_slope(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope (utilization per second) of (time, kv) samples; 0 with under 2 distinct times."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mk = sum(k for _, k in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    return sum((t - mt) * (k - mk) for t, k in samples) / var if var > 0 else 0.0


def kv_desired(
    current: int,
    kv: list[float],
    waiting: list[float],
    target_kv: float,
    target_waiting: float,
    kv_projected: float | None = None,
) -> tuple[int, dict[str, Any]]:
    """Engines wanted for these per-replica figures, and the figures (for the decision record).

    `kv_projected`: the hottest replica's utilization one time-to-ready ahead (look-ahead), if known."""
    kv_max = max(kv, default=0.0)
    total_waiting = sum(waiting)
    kv_drive = max(kv_max, kv_projected or 0.0)
    by_kv = math.ceil(current * kv_drive / target_kv - 1e-9)
    by_queue = math.ceil(total_waiting / target_waiting) if total_waiting else 0
    figures = {
        "kv_max": round(kv_max, 4),
        "kv_mean": round(sum(kv) / len(kv), 4) if kv else 0.0,
        "waiting": total_waiting,
        "target_kv": target_kv,
        "target_waiting": target_waiting,
        "by_kv": by_kv,
        "by_queue": by_queue,
    }
    if kv_projected is not None:
        figures["kv_projected"] = round(kv_projected, 4)
    return max(by_kv, by_queue, 1), figures


def load_desired(tokens_per_s: list[float], target_tokens_per_s: float) -> tuple[int, dict[str, Any]]:
    total = sum(tokens_per_s)
    figures = {"tokens_per_s": round(total, 2), "target_tokens_per_s": target_tokens_per_s}
    return max(1, math.ceil(total / target_tokens_per_s - 1e-9)), figures


@dataclass(frozen=True)
class Tick:
    """One control-loop step's outcome: what Serve applies and what is published and exported."""

    target: int
    state: dict[str, Any]  # the new policy_state
    wanted: int | None = None  # replicas the figures ask for (None: no figures yet, holding)
    max_replicas: int = 0
    decision: dict[str, Any] | None = None  # set when the target changes


class _Policy:
    """Common tick: read metrics of running replicas, ask `desire`, stabilize, bound; then publish."""

    metrics: tuple[str, ...] = ()

    def __init__(self, upscale_delay_s: float = 30.0, downscale_delay_s: float = 600.0):
        self.upscale_delay_s, self.downscale_delay_s = upscale_delay_s, downscale_delay_s
        self.publisher: DecisionPublisher | None = None  # made at the first decision (reads the pod's env)

    def desire(
        self, current: int, values: dict[str, list[float]], now: float, memory: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        """Replicas wanted and the figures behind it; `memory` persists across ticks (policy_state)."""
        raise NotImplementedError

    def decide(self, ctx: Any) -> Tick:
        """The target for this tick and the decision record, from `ctx` alone (no side effects)."""
        current = ctx.target_num_replicas
        metrics = ctx.aggregated_metrics or {}
        running = set(ctx.running_replicas)
        values = {name: [v for rid, v in (metrics.get(name) or {}).items() if rid in running] for name in self.metrics}
        if not values[self.metrics[0]]:
            return Tick(current, ctx.policy_state)  # no figures yet: hold
        now = ctx.current_time or time.time()
        memory = dict((ctx.policy_state or {}).get("memory") or {})
        wanted, figures = self.desire(max(ctx.current_num_replicas, 1), values, now, memory)
        lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        desired = min(max(wanted, lo), hi)
        pending = (ctx.policy_state or {}).get("pending", {})
        target, pending = stabilize(pending, now, current, desired, self.upscale_delay_s, self.downscale_delay_s)
        last = (ctx.policy_state or {}).get("last_decision")
        state = {"pending": pending, "last_decision": last, "memory": memory}
        decision = None
        if target != current:
            decision = {
                "time": now,
                "deployment": ctx.deployment_name,
                "from": current,
                "to": target,
                "direction": "up" if target > current else "down",
                "wanted": wanted,
                "min": lo,
                "max": hi,
                **figures,
            }
            state["last_decision"] = decision
        return Tick(target, state, wanted, hi, decision)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        """Serve's entry point: decide, publish a decision, export the figures."""
        tick = self.decide(ctx)
        if tick.decision is not None:
            if self.publisher is None:
                self.publisher = DecisionPublisher()
            self.publisher.publish(ctx.app_name or "default", tick.decision)
        if tick.wanted is not None:
            self.emit(tick.target, tick.wanted, tick.max_replicas, tick.decision)
        return tick.target, tick.state

    def emit(self, target: int, wanted: int, hi: int, decision: dict[str, Any] | None) -> None:
        """Export the tick's figures (ray.util.metrics; the Serve controller is a Ray worker)."""


class KVPressurePolicy(_Policy):
    """Attention engines: KV-cache utilization (hottest replica) against the target, plus the waiting queue.

    `labels` (model, deployment, pool, vendor) tag the autoscaler metrics it exports.
    """

    metrics = (KV_UTILIZATION, NUM_WAITING)

    def __init__(
        self,
        target_kv_utilization: float = 0.7,
        target_waiting: float = 4.0,
        labels: dict[str, str] | None = None,
        time_to_ready_s: float = 0.0,
        **delays: float,
    ):
        super().__init__(**delays)
        self.target_kv, self.target_waiting = target_kv_utilization, target_waiting
        self.labels = labels
        self.time_to_ready_s = time_to_ready_s
        self._metrics: Any = None

    def desire(
        self, current: int, values: dict[str, list[float]], now: float, memory: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        kv, waiting = values[KV_UTILIZATION], values[NUM_WAITING]
        projected = None
        if self.time_to_ready_s > 0:
            # A replica count change moves every replica's utilization: the trend restarts with it.
            samples = [(t, k) for t, k, n in memory.get("kv", []) if now - t <= TREND_WINDOW_S and n == current]
            samples.append((now, max(kv, default=0.0)))
            memory["kv"] = [(t, k, current) for t, k in samples]
            projected = min(1.0, samples[-1][1] + max(0.0, kv_slope(samples)) * self.time_to_ready_s)
        return kv_desired(current, kv, waiting, self.target_kv, self.target_waiting, kv_projected=projected)

    def emit(self, target: int, wanted: int, hi: int, decision: dict[str, Any] | None) -> None:
        if self.labels is None:
            return
        if self._metrics is None:
            from v4d.serving.metrics import ServingMetrics

            self._metrics = ServingMetrics(role="autoscaler", replica="", **self.labels)
            self._metrics.ready()
        m = self._metrics
        m.autoscale_target_replicas.set(target)
        m.autoscale_desired_replicas.set(wanted)
        m.autoscale_max_replicas.set(hi)
        if decision:
            m.autoscale_decisions.inc(tags={"direction": decision["direction"]})


class ExpertLoadPolicy(_Policy):
    """Expert shard replicas: routed token-expert pairs per second against a per-replica target."""

    metrics = (EXPERT_TOKENS_PER_S,)

    def __init__(self, target_tokens_per_s: float = 2000.0, **delays: float):
        super().__init__(**delays)
        self.target = target_tokens_per_s

    def desire(
        self, current: int, values: dict[str, list[float]], now: float, memory: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        return load_desired(values[EXPERT_TOKENS_PER_S], self.target)


def autoscaling_config(
    policy: type[_Policy], min_replicas: int, max_replicas: int, initial: int, interval_s: float = 1.0, **kwargs: Any
) -> dict[str, Any]:
    """A Serve `autoscaling_config` running `policy`; Serve's own delays are 0 (the policy stabilizes)."""
    return {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "initial_replicas": initial,
        "metrics_interval_s": interval_s,
        "look_back_period_s": max(2 * interval_s, 2.0),
        "upscale_delay_s": 0,
        "downscale_delay_s": 0,
        "aggregation_function": "max",
        "policy": {"policy_function": f"{policy.__module__}:{policy.__name__}", "policy_kwargs": kwargs},
    }
