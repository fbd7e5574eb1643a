"""Generated dashboards, rules, manifests and docs are committed as generated, and render in the chart."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from grafana_foundation_sdk.models.dashboard import Dashboard

from v4d.operator import dashboards, observability, rules
from v4d.operator.metrics import OPERATOR_METRICS
from v4d.serving.metrics import SERVING_METRICS

ROOT = Path(__file__).resolve().parents[2]


def test_committed_files_equal_generated():
    assert observability.stale_files(ROOT) == [], "run: python -m v4d.operator.observability"


def test_doc_tables_list_every_metric_rule_and_alert():
    doc = (ROOT / observability.DOC).read_text()
    for m in SERVING_METRICS + OPERATOR_METRICS:
        assert f"| `{m.name}` | `{m.exported}` |" in doc
    for r in rules.ALL_RULES:
        assert f"| `{r.record}` |" in doc
    for a in rules.ALERTS:
        assert f"| `{a['alert']}` |" in doc


def test_doc_without_generated_block_is_an_error():
    with pytest.raises(ValueError, match="missing the '<!-- generated:metrics -->'"):
        observability.fill_doc("# no blocks\n")


def test_dashboards_round_trip_and_have_the_template_variables():
    for spec in dashboards.DASHBOARDS:
        data = json.loads((ROOT / observability.DASHBOARD_DIR / f"{spec.uid}.json").read_text())
        model = Dashboard.from_json(data)
        assert model.uid == spec.uid and model.title == spec.title
        names = [v["name"] for v in data["templating"]["list"]]
        assert names == ["datasource", *spec.variables]
        ids = [p["id"] for p in data["panels"]]
        assert len(ids) == len(set(ids)), f"{spec.uid}: duplicate panel ids"
        for title, expr in dashboards.panel_exprs(data):
            assert "$namespace" in expr, f"{spec.uid} / {title}: not filtered by namespace"
    overview = json.loads((ROOT / observability.DASHBOARD_DIR / "v4d-overview.json").read_text())
    assert {"deployment", "pool"} <= {v["name"] for v in overview["templating"]["list"]}
    experts = json.loads((ROOT / observability.DASHBOARD_DIR / "v4d-experts.json").read_text())
    assert "heatmap" in {p["type"] for p in experts["panels"]}


def test_panels_read_only_recording_rules():
    dashboards.check_rules_exist()
    bad = dashboards.DashboardSpec(
        uid="x",
        title="x",
        description="x",
        rows=(("r", (dashboards.PanelSpec("p", "d", (("v4d:nothing:here", "l"),)),)),),
    )
    saved = dashboards.DASHBOARDS
    try:
        dashboards.DASHBOARDS = (bad,)
        with pytest.raises(ValueError, match="panel 'p': v4d:nothing:here is no recording rule"):
            dashboards.check_rules_exist()
    finally:
        dashboards.DASHBOARDS = saved


def _helm() -> str:
    local = ROOT / ".tools" / "bin" / "helm"
    helm = str(local) if local.exists() else shutil.which("helm")
    assert helm, "no helm binary in .tools/bin or PATH: run scripts/setup-kube.sh"
    return helm


def test_chart_renders_rules_and_dashboards_only_when_enabled(tmp_path):
    chart = ROOT / "charts" / "v4d"
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "XDG_CACHE_HOME": str(tmp_path / "c"),
        "XDG_CONFIG_HOME": str(tmp_path / "f"),
        "XDG_DATA_HOME": str(tmp_path / "d"),
    }

    def render(*sets: str) -> list[dict]:
        args = [_helm(), "template", "r", str(chart), "--namespace", "mon"] + [a for s in sets for a in ("--set", s)]
        out = subprocess.run(args, capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        return [d for d in yaml.safe_load_all(out.stdout) if d]

    def ours(docs: list[dict]) -> list[dict]:
        return [
            d for d in docs if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "observability"
        ]

    assert ours(render("prometheusRule.enabled=false", "grafana.dashboards.enabled=false")) == []
    docs = ours(
        render(
            "prometheusRule.enabled=true",
            "grafana.dashboards.enabled=true",
            "prometheusRule.labels.release=kps",
            "grafana.dashboards.namespace=grafana",
        )
    )
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["spec"] == rules.rule_groups()
    assert rule["metadata"]["labels"]["release"] == "kps" and rule["metadata"]["namespace"] == "mon"
    maps = {k: json.loads(v) for d in docs if d["kind"] == "ConfigMap" for k, v in d["data"].items()}
    assert maps == {f"{s.uid}.json": dashboards.build(s) for s in dashboards.DASHBOARDS}
    cms = [d for d in docs if d["kind"] == "ConfigMap"]
    assert all(d["metadata"]["labels"]["grafana_dashboard"] == "1" for d in cms)
    assert {d["metadata"]["namespace"] for d in cms} == {"grafana"}
    custom = ours(
        render(
            "grafana.dashboards.enabled=true",
            "grafana.dashboards.sidecarLabel=team_dash",
            "grafana.dashboards.sidecarLabelValue=v4d",
        )
    )
    assert {d["metadata"]["labels"]["team_dash"] for d in custom} == {"v4d"}
