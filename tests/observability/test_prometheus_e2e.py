"""End to end: a real Prometheus scrapes a running Serve app and the operator's metrics endpoint while
requests flow; every dashboard expression, template variable and recording rule must return data."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import httpx
import pytest
from v4d.operator import dashboards, observability, rules
from v4d.operator.metrics import OperatorMetrics, start_metrics_server

ROOT = Path(__file__).resolve().parents[2]
PROM_PORT, OPERATOR_PORT, RAY_METRICS_PORT, SERVE_PORT = 9090, 8392, 8393, 8394
ALL = ".*"  # what Grafana substitutes for a variable set to "All"


def _get(url: str, timeout: float = 5) -> bytes:
    return urllib.request.urlopen(url, timeout=timeout).read()


def _wait(what: str, check, timeout: float) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        assert time.time() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def serving():
    """The Serve app on an embedded Ray cluster; yields the HTTP base URL."""
    for k, v in {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                 "RAY_USAGE_STATS_ENABLED": "0", "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}.items():
        os.environ.setdefault(k, v)
    import metrics_app
    import ray
    from ray import serve

    ray.cloudpickle.register_pickle_by_value(metrics_app)  # replicas cannot import tests/
    ray.init(address="local", num_cpus=2, object_store_memory=150 * 2**20, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=RAY_METRICS_PORT, _system_config={"metrics_report_interval_ms": 1000})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": SERVE_PORT})
        serve.run(metrics_app.build(), name="e2e", route_prefix="/")
        yield f"http://127.0.0.1:{SERVE_PORT}/"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def operator_endpoint():
    """The operator's metrics registry and HTTP endpoint, as `v4d operator` serves them."""
    m = OperatorMetrics()
    server = start_metrics_server(m, OPERATOR_PORT, addr="127.0.0.1")
    yield m
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    """Debian's prometheus on 127.0.0.1 with our rules, scraping Ray and the operator every second."""
    d = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / observability.RULES_FILE)],
        "scrape_configs": [
            {"job_name": "ray", "static_configs": [{"targets": [f"127.0.0.1:{RAY_METRICS_PORT}"]}]},
            {"job_name": "v4d-operator", "static_configs": [{"targets": [f"127.0.0.1:{OPERATOR_PORT}"]}]},
        ],
    }
    (d / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    log = open(d / "prometheus.log", "w")
    proc = subprocess.Popen(["prometheus", f"--config.file={d / 'prometheus.yml'}",
                             f"--storage.tsdb.path={d / 'data'}", f"--web.listen-address=127.0.0.1:{PROM_PORT}"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait("prometheus ready", lambda: proc.poll() is None and _get(f"http://127.0.0.1:{PROM_PORT}/-/ready"), 30)
        yield f"http://127.0.0.1:{PROM_PORT}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


@pytest.fixture(scope="module")
def traffic(serving, operator_endpoint):
    """Requests flow (ok, 400 and 429) and the operator reconciles until the module ends."""
    stop = threading.Event()
    counts = {200: 0, 400: 0, 429: 0}

    def run():
        with httpx.Client(base_url=serving, timeout=30) as client:
            while not stop.is_set():
                for body in ({"prompt_tokens": 300, "max_tokens": 8}, {"max_tokens": 0}, {"max_tokens": 4, "overload": True}):
                    r = client.post("/", json=body)
                    counts[r.status_code] = counts.get(r.status_code, 0) + 1
                m = operator_endpoint
                with m.reconcile():
                    m.api_write("RayService")
                    m.api_write("ConfigMap")
                try:
                    with m.reconcile():
                        raise TimeoutError("apiserver timeout")
                except TimeoutError:
                    pass
                m.set_objects({"Ready": 1, "Pending": 0})
                time.sleep(0.2)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield counts
    stop.set()
    thread.join(timeout=60)


def _query(prom: str, expr: str) -> list[dict]:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(_get(url))
    assert body["status"] == "success", body
    return body["data"]["result"]


def _substitute(expr: str) -> str:
    return re.sub(r"\$(namespace|deployment|pool)\b", ALL, expr)


def _all_expressions() -> list[tuple[str, str]]:
    out = []
    for spec in dashboards.DASHBOARDS:
        data = json.loads((ROOT / observability.DASHBOARD_DIR / f"{spec.uid}.json").read_text())
        out += [(f"{spec.uid} / {title}", _substitute(expr)) for title, expr in dashboards.panel_exprs(data)]
    out += [(f"rule {r.record}", r.expr) for r in rules.ALL_RULES]
    return out


def test_every_panel_and_rule_returns_data(prometheus, traffic):
    exprs = _all_expressions()
    assert len(exprs) > 60
    missing: list[str] = []

    def all_have_data() -> bool:
        missing[:] = [f"{where}: {expr}" for where, expr in exprs if not _query(prometheus, expr)]
        return not missing

    try:
        _wait("every expression to return data", all_have_data, 150)
    except AssertionError:
        pytest.fail("no data for:\n" + "\n".join(missing) + f"\n(requests so far: {traffic})")
    assert traffic[200] > 0 and traffic[400] > 0 and traffic[429] > 0


def test_contract_values_reflect_the_traffic(prometheus, traffic):
    def value(expr: str) -> float:
        """The sum over all series of expr."""
        result = _query(prometheus, f"sum({expr})")
        assert result, f"no data for {expr}"
        return float(result[0]["value"][1])

    _wait("recording rules", lambda: _query(prometheus, "v4d:generation_tokens:rate2m"), 120)
    assert value('v4d:replicas_ready:sum{role="ingress"}') == 1
    assert value('v4d:replicas_ready:sum{role="experts", pool="npu-b"}') == 2
    assert value('v4d:kv_cache_usage:target{deployment="e2e", pool="gpu-a"}') == 0.7
    assert value('v4d:autoscale_max_replicas:max{deployment="e2e"}') == 2
    assert value("v4d:generation_tokens:rate2m") > 0
    assert value('v4d:requests_rejected:rate2m{reason="queue_full"}') > 0
    assert value('v4d:request_errors:rate2m{kind="bad_request"}') > 0
    assert value('v4d:operator_reconciles:rate5m{result="error"}') > 0
    assert value('v4d:operator_reconcile_errors:rate5m{reason="TimeoutError"}') > 0
    # the expert shards see 1x, 2x, 3x the tokens on layers 0, 1, 2 and split them evenly
    assert value('v4d:expert_balance:observed{layer="2"}') == pytest.approx(1.0, abs=0.2)
    assert value('sum(v4d:expert_tokens:rate2m{layer="2"}) / sum(v4d:expert_tokens:rate2m{layer="0"})') \
        == pytest.approx(3.0, rel=0.05)


def test_template_variables_have_values(prometheus, traffic):
    def label_values(name: str, match: str) -> list[str]:
        url = f"{prometheus}/api/v1/label/{name}/values?" + urllib.parse.urlencode({"match[]": match})
        return json.loads(_get(url))["data"]

    _wait("ready replicas", lambda: _query(prometheus, "v4d:replicas_ready:sum"), 120)
    for spec in dashboards.DASHBOARDS:
        data = json.loads((ROOT / observability.DASHBOARD_DIR / f"{spec.uid}.json").read_text())
        for var in data["templating"]["list"]:
            if var["type"] != "query" or var["name"] == "namespace":  # no namespace label outside Kubernetes
                continue
            source, label = re.fullmatch(r"label_values\((.*), (\w+)\)", var["query"]).groups()
            assert label_values(label, _substitute(source)), f"{spec.uid}: variable {label} has no values"
