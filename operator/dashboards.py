"""Grafana dashboards, built with grafana-foundation-sdk from the recording-rule contract.

Panels query only `v4d:*:*` recording rules (operator/rules.py), so dashboards survive exporter
changes. Each panel carries a description that says how to read it; docs/observability.md is
generated from the same `PanelSpec`s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import heatmap, stat, timeseries
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

from v4d.operator.rules import ALL_RULES

DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = 'namespace=~"$namespace", deployment=~"$deployment", pool=~"$pool"'
DSEL = 'namespace=~"$namespace", deployment=~"$deployment"'  # series without a pool label
NSEL = 'namespace=~"$namespace"'


@dataclass(frozen=True)
class PanelSpec:
    title: str
    description: str  # how to read the panel (shown in Grafana and in the docs)
    targets: tuple[tuple[str, str], ...]  # (PromQL, legend)
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | stat | heatmap
    width: int = 12


@dataclass(frozen=True)
class DashboardSpec:
    uid: str
    title: str
    description: str
    rows: tuple[tuple[str, tuple[PanelSpec, ...]], ...]
    variables: tuple[str, ...] = ("namespace", "deployment", "pool")
    variable_source: str = "v4d:replicas_ready:sum"  # a series every instance has, for label_values()


def _q(record: str, sel: str = SEL, extra: str = "") -> str:
    return f"{record}{{{sel}{', ' + extra if extra else ''}}}"


P = PanelSpec
OVERVIEW = DashboardSpec(
    uid="v4d-overview",
    title="v4d / V4Deployment overview",
    description="Saturation, autoscaling, latency and throughput of V4Deployments.",
    rows=(
        (
            "Saturation and autoscaling",
            (
                P(
                    "KV-cache usage per engine vs target",
                    "Each line is one engine replica's KV-cache usage (0-100 %); the dashed target is what the "
                    "autoscaler holds the fullest engine at. Lines above the target for minutes while replicas are "
                    "at max mean the deployment needs more capacity (alert V4DKVCachePressureAtMaxReplicas).",
                    (
                        (_q("v4d:kv_cache_usage:by_replica"), "{{pool}} {{replica}}"),
                        (_q("v4d:kv_cache_usage:target"), "target"),
                    ),
                    unit="percentunit",
                ),
                P(
                    "Replicas: desired vs ready",
                    "Ready replicas per role and pool against the engine replicas the autoscaler asks for, the "
                    "policy's unbounded wish and maxReplicas. Desired above ready for long: pods are pending "
                    "(no free accelerators); wish above desired: capped by maxReplicas (V4DCapacityLimited).",
                    (
                        (_q("v4d:replicas_ready:sum"), "ready {{role}} {{pool}}"),
                        (_q("v4d:replicas_desired:max"), "desired engines {{pool}}"),
                        (_q("v4d:autoscale_desired_replicas:max"), "policy wants {{pool}}"),
                        (_q("v4d:autoscale_max_replicas:max"), "max {{pool}}"),
                    ),
                ),
                P(
                    "Autoscaling decisions (10 min)",
                    "Scale-up and scale-down decisions of the KV-pressure policy over the last 10 minutes; frequent "
                    "alternation means the target or the delays are too tight (flapping).",
                    ((_q("v4d:autoscale_decisions:increase10m"), "{{direction}} {{pool}}"),),
                ),
                P(
                    "Queue depth and running requests",
                    "Requests waiting in engine queues vs in running batches. A growing queue with flat running "
                    "requests means the engines are full (KV or batch limit).",
                    (
                        (_q("v4d:requests_waiting:sum"), "waiting {{pool}}"),
                        (_q("v4d:requests_running:sum"), "running {{pool}}"),
                    ),
                ),
                P(
                    "Preemptions/s",
                    "Running requests evicted to free KV pages; they are recomputed later. Non-zero means KV "
                    "pressure beyond what scaling absorbs.",
                    ((_q("v4d:preemptions:rate2m"), "{{pool}}"),),
                    unit="ops",
                ),
                P(
                    "KV pages in use by kind",
                    "Compressed KV pages (128 token positions each) held per attention kind; state slots are "
                    "per-request sliding-window state.",
                    ((_q("v4d:kv_pages_in_use:sum"), "{{kind}} {{pool}}"),),
                ),
            ),
        ),
        (
            "Latency",
            (
                P(
                    "Time to first token p50 / p99",
                    "Arrival to first output token (includes queueing and prefill), over 2-minute windows.",
                    ((_q("v4d:ttft_seconds:p50"), "p50 {{pool}}"), (_q("v4d:ttft_seconds:p99"), "p99 {{pool}}")),
                    unit="s",
                ),
                P(
                    "Inter-token latency p50 / p99",
                    "Gap between consecutive output tokens while decoding; rises with batch size and preemptions.",
                    ((_q("v4d:itl_seconds:p50"), "p50 {{pool}}"), (_q("v4d:itl_seconds:p99"), "p99 {{pool}}")),
                    unit="s",
                ),
                P(
                    "End-to-end latency and queue time",
                    "Whole-request latency p50/p99 and p99 time spent queued before the first schedule.",
                    (
                        (_q("v4d:e2e_latency_seconds:p50"), "e2e p50 {{pool}}"),
                        (_q("v4d:e2e_latency_seconds:p99"), "e2e p99 {{pool}}"),
                        (_q("v4d:queue_time_seconds:p99"), "queue p99 {{pool}}"),
                    ),
                    unit="s",
                ),
            ),
        ),
        (
            "Throughput and outcomes",
            (
                P(
                    "Tokens/s in and out",
                    "Prompt tokens prefilled (in) and tokens generated (out) per second.",
                    (
                        (_q("v4d:prompt_tokens:rate2m"), "in {{pool}}"),
                        (_q("v4d:generation_tokens:rate2m"), "out {{pool}}"),
                    ),
                ),
                P(
                    "Finished requests/s by reason",
                    "stop = end of sequence or stop token, length = max_tokens reached, abort = client went away "
                    "or a text stop sequence matched.",
                    ((_q("v4d:requests_finished:rate2m"), "{{finished_reason}}"),),
                    unit="reqps",
                ),
                P(
                    "Rejected (HTTP 429)/s",
                    "Requests shed with 429 + Retry-After, by reason (queue_full: engine queue at max_queue).",
                    ((_q("v4d:requests_rejected:rate2m"), "{{reason}} {{pool}}"),),
                    unit="reqps",
                ),
                P(
                    "Errors/s by kind",
                    "Failed requests: bad_request / context_too_long are client errors (400); internal and "
                    "shard_unavailable are server errors (V4DEngineErrors alerts above 5 %).",
                    ((_q("v4d:request_errors:rate2m"), "{{kind}} {{pool}}"),),
                    unit="reqps",
                ),
            ),
        ),
    ),
)

EXPERTS = DashboardSpec(
    uid="v4d-experts",
    title="v4d / Experts",
    description="Expert-parallel load: tokens per shard and layer, balance, redundant copies.",
    rows=(
        (
            "Expert load",
            (
                P(
                    "Tokens/s per shard and layer",
                    "One row per (shard, MoE layer), colour = tokens/s routed to that shard's experts. A hot row "
                    "is a shard that bounds the layer's latency; compare rows within one layer.",
                    ((_q("v4d:expert_tokens:rate2m"), "{{shard}} L{{layer}}"),),
                    kind="heatmap",
                    width=24,
                ),
                P(
                    "Balance: max / mean tokens per layer",
                    "Measured per layer from the routed tokens (1.0 = perfectly even); the planned line is what "
                    "the placement (EPLB) expected. Sustained > 1.5 fires V4DExpertImbalance.",
                    (
                        (_q("v4d:expert_balance:observed", DSEL), "observed L{{layer}}"),
                        (_q("v4d:expert_balance:planned", DSEL), "planned"),
                    ),
                ),
                P(
                    "Tokens/s per shard",
                    "Total routed tokens per shard across layers.",
                    (("sum by (shard) (" + _q("v4d:expert_tokens:rate2m") + ")", "{{shard}}"),),
                ),
                P(
                    "Redundant expert copies",
                    "Extra physical copies of hot experts placed by EPLB (physical - logical experts).",
                    ((_q("v4d:expert_redundant_copies:max", DSEL), "{{deployment}}"),),
                    kind="stat",
                    width=6,
                ),
                P(
                    "Expert shards ready",
                    "Expert shard replicas serving, per pool.",
                    ((_q("v4d:replicas_ready:sum", SEL, 'role="experts"'), "{{pool}}"),),
                    kind="stat",
                    width=6,
                ),
            ),
        ),
    ),
)

OPERATOR = DashboardSpec(
    uid="v4d-operator",
    title="v4d / Operator",
    description="Health of the v4d operator: reconciles, errors, latency and objects by phase.",
    variables=("namespace",),
    variable_source="v4d:operator_objects:sum",
    rows=(
        (
            "Operator",
            (
                P(
                    "Reconciles/s by result",
                    "success, error (exception) and retry (planned requeue, e.g. waiting for KubeRay).",
                    ((_q("v4d:operator_reconciles:rate5m", NSEL), "{{result}}"),),
                    unit="ops",
                ),
                P(
                    "Reconcile errors/s by reason",
                    "Failed reconciles by exception class; persistent errors fire V4DOperatorReconcileErrors.",
                    ((_q("v4d:operator_reconcile_errors:rate5m", NSEL), "{{reason}}"),),
                    unit="ops",
                ),
                P(
                    "Reconcile duration p50 / p99",
                    "Time one reconcile takes (planning, rendering, API writes).",
                    (
                        (_q("v4d:operator_reconcile_duration_seconds:p50", NSEL), "p50"),
                        (_q("v4d:operator_reconcile_duration_seconds:p99", NSEL), "p99"),
                    ),
                    unit="s",
                ),
                P(
                    "V4Deployments by phase",
                    "Objects the operator manages, by status phase.",
                    ((_q("v4d:operator_objects:sum", NSEL), "{{phase}}"),),
                ),
                P(
                    "API writes/s by kind",
                    "Creates/patches/deletes the operator sends to the apiserver; a steady non-zero rate with "
                    "no spec changes means a reconcile loop that never converges.",
                    ((_q("v4d:operator_api_writes:rate5m", NSEL), "{{kind}}"),),
                    unit="ops",
                ),
            ),
        ),
    ),
)

DASHBOARDS: tuple[DashboardSpec, ...] = (OVERVIEW, EXPERTS, OPERATOR)

# Each variable narrows by the ones before it.
_VARIABLE_FILTER = {"namespace": "", "deployment": NSEL, "pool": DSEL}


def _variable(name: str, source: str) -> db.QueryVariable:
    query = f"label_values({source}{{{_VARIABLE_FILTER[name]}}}, {name})"
    return (
        db.QueryVariable(name)
        .label(name)
        .datasource(DS)
        .query(query)
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(dm.VariableOption(text="All", value="$__all"))
    )


DASHED = {"target"}  # reference lines, drawn dashed


def _panel(p: PanelSpec, panel_id: int):
    if p.kind == "stat":
        panel = stat.Panel().graph_mode(cm.BigValueGraphMode.AREA)
    elif p.kind == "heatmap":
        panel = (
            heatmap.Panel()
            .calculate(False)
            .cell_gap(1)
            .show_tooltip()
            .show_legend()
            .color(
                heatmap.HeatmapColorOptions()
                .mode("scheme")
                .scheme("Oranges")
                .fill("dark-orange")
                .scale("exponential")
                .exponent(0.5)
                .steps(64)
                .reverse(False)
            )
        )
    else:
        panel = (
            timeseries.Panel()
            .fill_opacity(10)
            .line_width(1)
            .span_nulls(False)
            .legend(
                cb.VizLegendOptions()
                .display_mode(cm.LegendDisplayMode.LIST)
                .placement(cm.LegendPlacement.BOTTOM)
                .show_legend(True)
            )
        )
        for _expr, legend in p.targets:
            if legend in DASHED:
                panel = panel.override_by_name(
                    legend, [dm.DynamicConfigValue("custom.lineStyle", {"fill": "dash", "dash": [10, 10]})]
                )
    panel = (
        panel.id(panel_id).title(p.title).description(p.description).datasource(DS).unit(p.unit).span(p.width).height(8)
    )
    for ref, (expr, legend) in zip("ABCDEFGH", p.targets, strict=False):
        panel = panel.with_target(Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DS))
    return panel


def build(spec: DashboardSpec) -> dict:
    """The dashboard as Grafana JSON (a dict)."""
    dash = (
        db.Dashboard(spec.title)
        .uid(spec.uid)
        .description(spec.description)
        .tags(["v4d", "generated"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .editable()
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    )
    for name in spec.variables:
        dash = dash.with_variable(_variable(name, spec.variable_source))
    panel_id = 0
    for title, panels in spec.rows:
        panel_id += 1
        dash = dash.with_row(db.Row(title).id(panel_id))
        for p in panels:
            panel_id += 1
            dash = dash.with_panel(_panel(p, panel_id))
    return json.loads(JSONEncoder(sort_keys=True, indent=2).encode(dash.build()))


def render_json(spec: DashboardSpec) -> str:
    return json.dumps(build(spec), indent=2, sort_keys=True) + "\n"


def panel_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of a dashboard JSON."""
    return [(p["title"], t["expr"]) for p in dashboard.get("panels", []) for t in p.get("targets", [])]


def check_rules_exist() -> None:
    """Every `v4d:*:*` series a panel reads is a recording rule (raises ValueError naming the panel)."""
    import re

    records = {r.record for r in ALL_RULES}
    for spec in DASHBOARDS:
        for _row, panels in spec.rows:
            for p in panels:
                for expr, _ in p.targets:
                    for name in re.findall(r"v4d:[a-z0-9_]+:[a-z0-9_]+", expr):
                        if name not in records:
                            raise ValueError(f"dashboard {spec.uid} panel {p.title!r}: {name} is no recording rule")
