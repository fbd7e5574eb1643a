"""Prometheus recording rules (the metric contract) and alerts, generated from the catalogues.

Dashboards and the autoscaler read only the `v4d:*:*` series recorded here, never the raw
exporter names, so a change of exporter (Ray's `ray_` prefix, its extra labels, a restart that adds a
series with a new WorkerId) stays inside these rules. Every contract series carries the labels in
`CONTRACT_LABELS` (plus its own, e.g. `replica`, `role`, `direction`); `namespace` comes from the
scrape (PodMonitor) and is simply absent in local runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from v4d.operator.metrics import OPERATOR_METRICS
from v4d.serving.metrics import BY_NAME

CONTRACT_LABELS = "namespace, deployment, model, pool"
RATE_WINDOW = "2m"  # >= 4 scrapes at the 30 s PodMonitor default


@dataclass(frozen=True)
class Rule:
    record: str
    expr: str
    help: str  # for the docs table


def _m(name: str) -> str:
    """Exported series of a catalogue name (serving or operator)."""
    if name in BY_NAME:
        return BY_NAME[name].exported
    return next(m.exported for m in OPERATOR_METRICS if m.name == name)


def _by(extra: str = "") -> str:
    return CONTRACT_LABELS + (f", {extra}" if extra else "")


def _rate(name: str, extra: str = "") -> str:
    return f"sum by ({_by(extra)}) (rate({_m(name)}[{RATE_WINDOW}]))"


def _quantile(q: float, name: str) -> str:
    return f"histogram_quantile({q}, sum by ({_by('le')}) (rate({_m(name)}_bucket[{RATE_WINDOW}])))"


def _latency_rules(short: str, name: str, what: str) -> list[Rule]:
    return [
        Rule(f"v4d:{short}:p{int(q * 100)}", _quantile(q, name), f"{what}, p{int(q * 100)} over {RATE_WINDOW}")
        for q in (0.5, 0.99)
    ]


SERVING_RULES: tuple[Rule, ...] = (
    Rule(
        "v4d:kv_cache_usage:by_replica",
        f"max by ({_by('role, replica')}) ({_m('vllm:kv_cache_usage_perc')})",
        "KV-cache usage of each engine replica (0-1)",
    ),
    Rule(
        "v4d:kv_cache_usage:max",
        f"max by ({_by()}) ({_m('vllm:kv_cache_usage_perc')})",
        "KV-cache usage of the fullest engine replica (what the autoscaler holds at the target)",
    ),
    Rule(
        "v4d:kv_cache_usage:avg",
        f"avg by ({_by()}) ({_m('vllm:kv_cache_usage_perc')})",
        "Mean KV-cache usage over engine replicas",
    ),
    Rule(
        "v4d:kv_cache_usage:target",
        f"max by ({_by()}) ({_m('v4d:kv_cache_usage_target')})",
        "Target KV-cache usage of the autoscaler",
    ),
    Rule(
        "v4d:requests_running:sum",
        f"sum by ({_by()}) ({_m('vllm:num_requests_running')})",
        "Requests in running batches",
    ),
    Rule(
        "v4d:requests_waiting:sum",
        f"sum by ({_by()}) ({_m('vllm:num_requests_waiting')})",
        "Requests queued in engines (queue depth)",
    ),
    Rule(
        "v4d:replicas_ready:sum",
        f"sum by ({_by('role')}) ({_m('v4d:replica_ready')})",
        "Ready replicas per role and pool",
    ),
    Rule(
        "v4d:replicas_desired:max",
        f"max by ({_by()}) ({_m('v4d:autoscale_target_replicas')})",
        "Engine replicas the autoscaler asks for",
    ),
    Rule(
        "v4d:autoscale_desired_replicas:max",
        f"max by ({_by()}) ({_m('v4d:autoscale_desired_replicas')})",
        "Engine replicas the KV-pressure policy wants before the max bound",
    ),
    Rule(
        "v4d:autoscale_max_replicas:max",
        f"max by ({_by()}) ({_m('v4d:autoscale_max_replicas')})",
        "Upper bound on engine replicas",
    ),
    Rule(
        "v4d:autoscale_decisions:increase10m",
        f"sum by ({_by('direction')}) (increase({_m('v4d:autoscale_decisions_total')}[10m]))",
        "Scale-up / scale-down decisions in the last 10 minutes",
    ),
    *_latency_rules("ttft_seconds", "vllm:time_to_first_token_seconds", "Time to first token"),
    *_latency_rules("itl_seconds", "vllm:inter_token_latency_seconds", "Inter-token latency"),
    *_latency_rules("e2e_latency_seconds", "vllm:e2e_request_latency_seconds", "End-to-end request latency"),
    *_latency_rules("queue_time_seconds", "vllm:request_queue_time_seconds", "Queue time before first schedule"),
    Rule("v4d:prompt_tokens:rate2m", _rate("vllm:prompt_tokens_total"), "Prompt tokens/s (in)"),
    Rule("v4d:generation_tokens:rate2m", _rate("vllm:generation_tokens_total"), "Generated tokens/s (out)"),
    Rule(
        "v4d:requests_finished:rate2m",
        _rate("vllm:request_success_total", "finished_reason"),
        "Finished requests/s by finish reason",
    ),
    Rule("v4d:preemptions:rate2m", _rate("vllm:num_preemptions_total"), "Preemptions/s"),
    Rule(
        "v4d:requests_rejected:rate2m",
        _rate("v4d:requests_rejected_total", "reason"),
        "Requests/s refused with HTTP 429, by reason",
    ),
    Rule("v4d:request_errors:rate2m", _rate("v4d:request_errors_total", "kind"), "Failed requests/s by kind"),
    Rule(
        "v4d:kv_pages_in_use:sum",
        f"sum by ({_by('kind')}) ({_m('v4d:kv_pages_in_use')})",
        "Compressed KV pages in use by kind",
    ),
    Rule(
        "v4d:expert_tokens:rate2m",
        _rate("v4d:expert_tokens_total", "shard, layer"),
        "Tokens/s routed to each shard, per MoE layer",
    ),
    Rule(
        "v4d:expert_balance:observed",
        "max by (namespace, deployment, model, layer) (sum by (namespace, deployment, model, layer, shard) "
        "(v4d:expert_tokens:rate2m)) / avg by (namespace, deployment, model, layer) (sum by (namespace, "
        "deployment, model, layer, shard) (v4d:expert_tokens:rate2m))",
        "Measured max/mean tokens across shards, per layer (1 = even)",
    ),
    Rule(
        "v4d:expert_balance:planned",
        f"max by (namespace, deployment, model) ({_m('v4d:expert_balance_max_over_mean')})",
        "Max/mean expert load the placement was planned for",
    ),
    Rule(
        "v4d:expert_redundant_copies:max",
        f"max by (namespace, deployment, model) ({_m('v4d:expert_redundant_copies')})",
        "Redundant expert copies placed by EPLB",
    ),
)

OPERATOR_RULES: tuple[Rule, ...] = (
    Rule(
        "v4d:operator_reconciles:rate5m",
        f"sum by (namespace, result) (rate({_m('v4d_operator_reconciles_total')}[5m]))",
        "Reconciles/s by result",
    ),
    Rule(
        "v4d:operator_reconcile_errors:rate5m",
        f"sum by (namespace, reason) (rate({_m('v4d_operator_reconcile_errors_total')}[5m]))",
        "Reconcile errors/s by reason",
    ),
    *[
        Rule(
            f"v4d:operator_reconcile_duration_seconds:p{int(q * 100)}",
            f"histogram_quantile({q}, sum by (namespace, le) "
            f"(rate({_m('v4d_operator_reconcile_duration_seconds')}_bucket[5m])))",
            f"Reconcile duration, p{int(q * 100)} over 5m",
        )
        for q in (0.5, 0.99)
    ],
    Rule(
        "v4d:operator_objects:sum",
        f"sum by (namespace, phase) ({_m('v4d_operator_objects')})",
        "V4Deployments by phase",
    ),
    Rule(
        "v4d:operator_api_writes:rate5m",
        f"sum by (namespace, kind) (rate({_m('v4d_operator_api_writes_total')}[5m]))",
        "Kubernetes API writes/s by kind",
    ),
)

_ON = "on (namespace, deployment, pool)"

ALERTS: tuple[dict, ...] = (
    {
        "alert": "V4DKVCachePressureAtMaxReplicas",
        "expr": f"v4d:kv_cache_usage:max > {_ON} v4d:kv_cache_usage:target + 0.05\n"
        f"and {_ON} v4d:replicas_desired:max >= {_ON} v4d:autoscale_max_replicas:max",
        "for": "10m",
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "{{ $labels.deployment }}: KV cache above target at max replicas",
            "description": "KV-cache usage {{ $value | humanizePercentage }} has stayed above the "
            "autoscaling target for 10m while the engine runs at maxReplicas; raise "
            "maxReplicas or expect preemptions and 429s.",
        },
    },
    {
        "alert": "V4DCapacityLimited",
        "expr": f"v4d:autoscale_desired_replicas:max > {_ON} v4d:replicas_desired:max",
        "for": "10m",
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "{{ $labels.deployment }}: autoscaler wants more engines than allowed",
            "description": "The KV-pressure policy asks for {{ $value }} engine replicas, more than "
            "maxReplicas or the pool's free devices allow.",
        },
    },
    {
        "alert": "V4DReplicasNotReady",
        "expr": f"v4d:replicas_desired:max > {_ON} sum by (namespace, deployment, pool) "
        '(v4d:replicas_ready:sum{role="engine"})',
        "for": "15m",
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "{{ $labels.deployment }}: engine replicas not ready",
            "description": "Fewer engine replicas are ready than the autoscaler asks for; check for "
            "pending pods (no free accelerators in pool {{ $labels.pool }}).",
        },
    },
    {
        "alert": "V4DExpertImbalance",
        "expr": "max by (namespace, deployment, model) (v4d:expert_balance:observed) > 1.5",
        "for": "30m",
        "labels": {"severity": "info"},
        "annotations": {
            "summary": "{{ $labels.deployment }}: expert load imbalanced",
            "description": "The busiest expert shard gets {{ $value | humanize }}x the mean tokens "
            "of a layer; re-plan placement with the measured load.",
        },
    },
    {
        "alert": "V4DEngineErrors",
        "expr": "sum by (namespace, deployment) "
        '(v4d:request_errors:rate2m{kind=~"internal|shard_unavailable|unavailable|timeout"})\n'
        "/ (sum by (namespace, deployment) (v4d:requests_finished:rate2m)\n"
        "   + sum by (namespace, deployment) (v4d:request_errors:rate2m)) > 0.05",
        "for": "5m",
        "labels": {"severity": "critical"},
        "annotations": {
            "summary": "{{ $labels.deployment }}: engine errors",
            "description": "{{ $value | humanizePercentage }} of requests fail on the server side "
            "(internal error, shard or replica unavailable, timeout).",
        },
    },
    {
        "alert": "V4DServingMetricsAbsent",
        "expr": f"sum({_m('v4d_operator_objects')}) > 0 unless on () count({_m('v4d:replica_ready')})",
        "for": "10m",
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "V4Deployments exist but no serving metrics are scraped",
            "description": "Dashboards and KV autoscaling are blind: check the PodMonitor for the "
            "Ray pods (port metrics) and the Ray metrics export port.",
        },
    },
    {
        "alert": "V4DOperatorMetricsAbsent",
        "expr": f"absent({_m('v4d_operator_reconciles_total')})",
        "for": "10m",
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "The v4d operator exports no metrics",
            "description": "No v4d_operator_reconciles_total series: the operator is down or not "
            "scraped (ServiceMonitor).",
        },
    },
    {
        "alert": "V4DOperatorReconcileErrors",
        "expr": "sum by (namespace) (v4d:operator_reconcile_errors:rate5m) > 0",
        "for": "15m",
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "v4d operator reconciles keep failing",
            "description": '{{ printf "%.3f" $value }} reconcile errors/s for 15m; see the '
            "V4Deployment conditions and operator logs.",
        },
    },
)

ALL_RULES: tuple[Rule, ...] = SERVING_RULES + OPERATOR_RULES


def rule_groups() -> dict:
    """The rules in Prometheus' rule-file format (`groups:`), also the PrometheusRule `spec`."""

    def records(rules: tuple[Rule, ...]) -> list[dict]:
        return [{"record": r.record, "expr": r.expr} for r in rules]

    return {
        "groups": [
            {"name": "v4d.serving.contract", "rules": records(SERVING_RULES)},
            {"name": "v4d.operator.contract", "rules": records(OPERATOR_RULES)},
            {"name": "v4d.alerts", "rules": [dict(a) for a in ALERTS]},
        ]
    }


def prometheus_rule(name: str = "v4d", namespace: str | None = None) -> dict:
    """The same rules as a Prometheus Operator `PrometheusRule` object."""
    metadata: dict = {
        "name": name,
        "labels": {"app.kubernetes.io/name": "v4d", "app.kubernetes.io/component": "observability"},
    }
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": metadata,
        "spec": rule_groups(),
    }
