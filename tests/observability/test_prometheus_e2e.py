"""End to end: a real Prometheus scrapes a running `v4d serve` and the operator's metrics endpoint while
requests flow; every dashboard expression, template variable and recording rule must return data."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import yaml
from helpers.kubecluster import stop_process

from v4d.operator import dashboards, observability, rules

pytestmark = [pytest.mark.apiserver, pytest.mark.ray, pytest.mark.prometheus]

ROOT = Path(__file__).resolve().parents[2]
PROM_PORT, OPERATOR_PORT, SERVE_PORT = 9090, 8392, 8350  # v4d serve: metrics on SERVE_PORT+1...
ALL = ".*"  # what Grafana substitutes for a variable set to "All"
RAY_START_TIMEOUT = "The current node timed out during startup"


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


@dataclass
class Served:
    api: str  # OpenAI base URL
    metrics: list[str]  # host:port of every Ray node's metrics export


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    """`v4d serve` on examples/local-tiny.yaml with a tiny queue, so bursts get 429s."""
    d = tmp_path_factory.mktemp("serve")
    manifest = yaml.safe_load((ROOT / "examples" / "local-tiny.yaml").read_text())
    manifest["spec"]["serving"].update({"maxNumSeqs": 2, "maxQueue": 1})
    (d / "tiny.yaml").write_text(yaml.safe_dump(manifest))
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ADDRESS": "",
    }
    cmd = [
        sys.executable,
        "-c",
        "from v4d.operator.cli import main; main()",
        "serve",
        str(d / "tiny.yaml"),
        "--port",
        str(SERVE_PORT),
    ]

    def start(attempt: int) -> tuple[subprocess.Popen, Path]:
        log = d / f"serve-{attempt}.log"
        with open(log, "w") as out:
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env), log

    proc, log = start(1)
    try:
        deadline = time.time() + 420
        while "press Ctrl-C to stop" not in log.read_text():
            if proc.poll() is not None and RAY_START_TIMEOUT in log.read_text() and log.name == "serve-1.log":
                proc, log = start(2)  # Ray's fixed 30 s raylet start wait can expire on a loaded machine
            assert proc.poll() is None, f"v4d serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
            assert time.time() < deadline, f"v4d serve not ready after 420 s:\n{log.read_text()[-4000:]}"
            time.sleep(1)
        metrics = re.findall(r"metrics \([^)]*\): http://(127\.0\.0\.1:\d+)/metrics", log.read_text())
        assert metrics, log.read_text()
        yield Served(api=f"http://127.0.0.1:{SERVE_PORT}/v1", metrics=metrics)
    finally:
        proc.send_signal(signal.SIGINT)  # `v4d serve` shuts every Ray process down
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def operator_endpoint(cluster, tmp_path_factory):
    """`v4d operator` on the real control plane, serving its metrics on OPERATOR_PORT; yields the
    namespace of the deployment that reconciles.

    It reconciles examples/local-tiny.yaml in one namespace (writes children) and in another whose
    ResourceQuota forbids Services, where every reconcile fails with the apiserver's 403
    (ForbiddenException) and kopf retries.
    """
    good, quota = cluster.namespace("obs"), cluster.namespace("obs-quota")
    cluster.forbid_services(quota)
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    proc = cluster.start_operator(
        log, "-n", good, "-n", quota, "--metrics-port", str(OPERATOR_PORT), "--metrics-addr", "127.0.0.1"
    )
    try:
        manifest = yaml.safe_load((ROOT / "examples" / "local-tiny.yaml").read_text())
        manifest["spec"]["model"]["weights"]["uri"] = "pvc://tiny-weights/ckpt"
        for ns in (good, quota):
            cluster.custom().create_namespaced_custom_object(
                "serving.v4d.dev", "v1alpha1", ns, "v4deployments", manifest
            )
        _wait(
            "the operator's metrics endpoint",
            lambda: (
                proc.poll() is None
                and b"v4d_operator_reconciles_total" in _get(f"http://127.0.0.1:{OPERATOR_PORT}/metrics")
            ),
            60,
        )
        yield good
    finally:
        stop_process(proc)
        for ns in (good, quota):  # the quota's object would keep failing under the operator tests' operator
            cluster.core().delete_namespace(ns)
    assert proc.returncode == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, serving):
    """Debian's prometheus on 127.0.0.1 with our rules, scraping Ray and the operator every second."""
    d = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / observability.RULES_FILE)],
        "scrape_configs": [
            {"job_name": "ray", "static_configs": [{"targets": serving.metrics}]},
            {"job_name": "v4d-operator", "static_configs": [{"targets": [f"127.0.0.1:{OPERATOR_PORT}"]}]},
        ],
    }
    (d / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    log = open(d / "prometheus.log", "w")
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={d / 'prometheus.yml'}",
            f"--storage.tsdb.path={d / 'data'}",
            f"--web.listen-address=127.0.0.1:{PROM_PORT}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait("prometheus ready", lambda: proc.poll() is None and _get(f"http://127.0.0.1:{PROM_PORT}/-/ready"), 30)
        yield f"http://127.0.0.1:{PROM_PORT}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


@pytest.fixture(scope="module")
def traffic(serving, operator_endpoint):
    """Chat requests flow (bursts past the queue get 429, over-long ones 400) until the module ends,
    while the operator reconciles."""
    stop = threading.Event()
    counts: dict[str, int] = {"ok": 0, "429": 0, "400": 0}
    client = openai.OpenAI(base_url=serving.api, api_key="unused", max_retries=0, timeout=120)

    def chat(max_tokens: int) -> None:
        try:
            stream = client.chat.completions.create(
                model="v4-tiny",
                messages=[{"role": "user", "content": "Count to ten."}],
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
            )
            for _ in stream:
                pass
            counts["ok"] += 1
        except openai.RateLimitError:
            counts["429"] += 1
        except openai.BadRequestError:
            counts["400"] += 1
        except openai.APIError as e:  # counted, so a failure report shows what went wrong
            key = f"{type(e).__name__}: {str(e)[:200]}"
            counts[key] = counts.get(key, 0) + 1

    def requests() -> None:
        while not stop.is_set():
            burst = [threading.Thread(target=chat, args=(6,)) for _ in range(5)]
            for t in burst:
                t.start()
            chat(100_000)  # beyond maxContextTokens: 400 from the ingress
            try:
                client.get("/no-such-route", cast_to=object)  # 404 from the router
            except openai.NotFoundError:
                counts["404"] = counts.get("404", 0) + 1
            for t in burst:
                t.join()

    thread = threading.Thread(target=requests, daemon=True)
    thread.start()
    yield counts
    stop.set()
    thread.join(timeout=150)


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
    assert traffic["ok"] > 0 and traffic["400"] > 0 and traffic["429"] > 0, traffic


def test_contract_values_reflect_the_traffic(prometheus, traffic, operator_endpoint, cluster):
    def value(expr: str) -> float | None:
        """The sum over all series of expr (None: no series)."""
        result = _query(prometheus, f"sum({expr})")
        return float(result[0]["value"][1]) if result else None

    def eventually(expr: str, check, timeout: float = 120) -> None:
        """Rates need two scrapes after the event, and Ray exports with a delay: poll."""
        try:
            _wait(expr, lambda: (v := value(expr)) is not None and check(v), timeout)
        except AssertionError:
            pytest.fail(f"{expr} = {value(expr)} (requests so far: {traffic})")

    tiny = {"deployment": "tiny", "engine_pool": "gpu", "target": 0.7, "max_replicas": 2}  # examples/local-tiny.yaml
    eventually(f'v4d:replicas_ready:sum{{role="engine", pool="{tiny["engine_pool"]}"}}', lambda v: v >= 1)
    eventually('v4d:replicas_ready:sum{role="experts"}', lambda v: v >= 2)  # experts split over both pools
    eventually(f'v4d:kv_cache_usage:target{{deployment="{tiny["deployment"]}"}}', lambda v: v == tiny["target"])
    eventually(
        f'v4d:autoscale_max_replicas:max{{deployment="{tiny["deployment"]}"}}', lambda v: v == tiny["max_replicas"]
    )
    # A serving change once Prometheus has seen the operator's first writes: an in-place RayService update.
    _wait(
        "the operator's writes scraped",
        lambda: _query(prometheus, 'v4d_operator_api_writes_total{kind="RayService"}'),
        60,
    )
    cluster.custom().patch_namespaced_custom_object(
        "serving.v4d.dev",
        "v1alpha1",
        operator_endpoint,
        "v4deployments",
        "tiny",
        {"spec": {"serving": {"maxNumSeqs": 4}}},
    )
    for rate in (
        "v4d:generation_tokens:rate2m",
        "v4d:prompt_tokens:rate2m",
        "v4d:expert_tokens:rate2m",
        'v4d:requests_rejected:rate2m{reason="queue_full"}',
        'v4d:requests_finished:rate2m{finished_reason="length"}',
        'v4d:request_errors:rate2m{kind="context_too_long", pool=""}',  # the ingress's own 400s
        'v4d:request_errors:rate2m{kind="not_found", pool=""}',  # and the router's 404s
        'v4d:operator_reconciles:rate5m{result="error"}',
        'v4d:operator_reconcile_errors:rate5m{reason="ForbiddenException"}',  # the quota's 403
        'v4d:operator_api_writes:rate5m{kind="RayService"}',
    ):
        eventually(rate, lambda v: v > 0)
    eventually("max_over_time(v4d:ttft_seconds:p99[15m])", lambda v: 0 < v < 120)
    eventually('v4d:operator_objects:sum{phase="Deploying"}', lambda v: v == 1)  # applied, nothing serves yet
    eventually('v4d:operator_objects:sum{phase="Degraded"}', lambda v: v == 1)  # its Service refused


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
