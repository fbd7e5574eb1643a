"""Serving metric catalogue: names follow the contract, and Ray exports what the catalogue says."""

import os
import re
import time
import urllib.request
from pathlib import Path

import pytest

from v4d.serving import metrics as sm

ROOT = Path(__file__).resolve().parents[2]
EXPORT_PORT = 8390  # this part's port range (8300-8399)


def test_every_contract_metric_is_in_the_catalogue():
    text = (ROOT / "docs" / "contracts.md").read_text()
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    serving_part = section.split("Operator (", 1)[0]
    contract = set(re.findall(r"`((?:vllm|v4d):[a-z0-9_]+)", serving_part))
    assert len(contract) >= 18
    assert contract <= set(sm.BY_NAME), contract - set(sm.BY_NAME)


@pytest.mark.parametrize(
    ("name", "exported"),
    [
        ("vllm:kv_cache_usage_perc", "ray_vllm_kv_cache_usage_perc"),
        ("vllm:prompt_tokens_total", "ray_vllm_prompt_tokens_total"),
        ("vllm:time_to_first_token_seconds", "ray_vllm_time_to_first_token_seconds"),
        ("v4d:expert_tokens_total", "ray_v4d_expert_tokens_total"),
    ],
)
def test_exported_names_are_ray_prefixed_with_colons_replaced(name, exported):
    assert sm.BY_NAME[name].exported == exported


def test_catalogue_is_well_formed():
    assert len(sm.BY_ATTR) == len(sm.SERVING_METRICS) == len(sm.BY_NAME)
    for spec in sm.SERVING_METRICS:
        assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", spec.registered), spec.name  # Ray drops ':' names
        assert spec.kind in (sm.COUNTER, sm.GAUGE, sm.HISTOGRAM)
        assert (spec.kind == sm.COUNTER) == spec.name.endswith("_total"), spec.name
        assert (spec.kind == sm.HISTOGRAM) == bool(spec.buckets), spec.name
        assert list(spec.buckets) == sorted(set(spec.buckets)), spec.name
        assert spec.recorded_by and set(spec.recorded_by) <= set(sm.ROLES), spec.name
        assert set(spec.values) <= set(spec.tags) and not set(spec.tags) & set(sm.BASE_TAGS), spec.name


def test_recorder_rejects_misuse():
    m = sm.ServingMetrics(model="m", deployment="d", role="engine", replica="r0")
    with pytest.raises(ValueError, match=r"tags must be exactly \['finished_reason'\]"):
        m.request_success.inc(tags={"reason": "stop"})
    with pytest.raises(ValueError, match="tags must be exactly"):
        m.request_success.inc()
    with pytest.raises(TypeError, match="is a gauge, not a counter"):
        m.kv_cache_usage.inc()
    with pytest.raises(ValueError, match="counters only go up"):
        m.prompt_tokens.inc(-1)
    with pytest.raises(AttributeError, match="no serving metric 'kv_usage'"):
        m.kv_usage  # noqa: B018
    with pytest.raises(ValueError, match="role must be one of"):
        sm.ServingMetrics(model="m", deployment="d", role="decode")


def test_catalogues_and_generators_import_neither_ray_torch_nor_kopf():
    import subprocess
    import sys

    code = (
        "import sys, v4d.serving.metrics, v4d.operator.metrics, v4d.operator.rules, v4d.operator.dashboards, "
        "v4d.operator.observability; print(sorted({'ray', 'torch', 'kopf'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def ray_scrape():
    """Records every catalogue metric from a Ray actor and returns Ray's Prometheus text."""
    for k, v in {
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }.items():
        os.environ.setdefault(k, v)
    import ray

    ray.init(
        address="local",
        num_cpus=1,
        object_store_memory=100 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=EXPORT_PORT,
        _system_config={"metrics_report_interval_ms": 500},
    )

    @ray.remote(num_cpus=0)
    class Recorder:
        def record(self):
            m = sm.ServingMetrics(
                model="v4-tiny", deployment="demo", role="engine", pool="gpu-a", vendor="nvidia", replica="r0"
            )
            m.ready()
            m.kv_cache_usage.set(0.25)
            m.prompt_tokens.inc(7)
            m.ttft.observe(0.02)
            m.kv_pages_in_use.set(3, {"kind": "csa"})
            e = sm.ServingMetrics(
                model="v4-tiny", deployment="demo", role="experts", pool="npu-b", vendor="ascend", replica="s0"
            )
            e.expert_tokens.inc(5, {"shard": "experts-npu-b-0", "layer": 2})
            self.m = m
            return True

        def set_and_clear(self, kind):
            self.m.kv_pages_in_use.set(1, {"kind": kind})
            self.m.kv_pages_in_use.clear({"kind": kind})
            return sorted(dict(key[1])["kind"] for key in sm._LIVE_GAUGES if key[0] == "v4d:kv_pages_in_use")

    try:
        started = time.time()
        actor = Recorder.remote()
        assert ray.get(actor.record.remote())
        deadline = time.time() + 30
        while True:
            text = urllib.request.urlopen(f"http://127.0.0.1:{EXPORT_PORT}/metrics").read().decode()
            if "ray_v4d_expert_tokens_total{" in text and "ray_vllm_request_success_total{" in text:
                break
            assert time.time() < deadline, "catalogue metrics did not reach Ray's exporter in 30 s"
            time.sleep(0.5)
        yield text, actor, started
    finally:
        ray.shutdown()


def _samples(text: str, name: str) -> list[dict[str, str]]:
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for family in text_string_to_metric_families(text):
        out += [dict(s.labels, __value__=s.value) for s in family.samples if s.name == name]
    return out


def _scrape() -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{EXPORT_PORT}/metrics").read().decode()


@pytest.mark.ray
def test_ray_exports_catalogue_names_with_default_tags(ray_scrape):
    ray_scrape, _, _ = ray_scrape
    (kv,) = _samples(ray_scrape, "ray_vllm_kv_cache_usage_perc")
    assert kv["__value__"] == 0.25
    assert {k: kv[k] for k in sm.BASE_TAGS} == {
        "model": "v4-tiny",
        "deployment": "demo",
        "role": "engine",
        "pool": "gpu-a",
        "vendor": "nvidia",
        "replica": "r0",
    }
    assert _samples(ray_scrape, "ray_vllm_prompt_tokens_total")[0]["__value__"] == 7
    assert _samples(ray_scrape, "ray_vllm_time_to_first_token_seconds_count")[0]["__value__"] == 1
    (pages,) = _samples(ray_scrape, "ray_v4d_kv_pages_in_use")
    assert pages["kind"] == "csa"
    (tokens,) = _samples(ray_scrape, "ray_v4d_expert_tokens_total")
    assert (tokens["shard"], tokens["layer"], tokens["role"], tokens["__value__"]) == (
        "experts-npu-b-0",
        "2",
        "experts",
        5,
    )


@pytest.mark.ray
def test_ready_marks_replica_and_zero_initialises_bounded_counters(ray_scrape):
    ray_scrape, _, _ = ray_scrape
    assert [s["__value__"] for s in _samples(ray_scrape, "ray_v4d_replica_ready")] == [1]
    success = {s["finished_reason"]: s["__value__"] for s in _samples(ray_scrape, "ray_vllm_request_success_total")}
    assert success == {"stop": 0, "length": 0, "abort": 0}
    errors = {s["kind"] for s in _samples(ray_scrape, "ray_v4d_request_errors_total")}
    assert errors == set(sm.ERROR_KINDS)
    assert _samples(ray_scrape, "ray_vllm_num_preemptions_total")[0]["__value__"] == 0
    # autoscaler counters belong to the autoscaler role, not the engine replica
    assert _samples(ray_scrape, "ray_v4d_autoscale_decisions_total") == []


@pytest.mark.ray
def test_gauges_set_once_stay_exported(ray_scrape):
    import ray

    _, actor, started = ray_scrape
    assert ray.get(actor.set_and_clear.remote("hca")) == ["csa"]  # hca is no longer kept alive
    # Without the keep-alive Ray drops a gauge ~20 s after its only set() (measured on 2.60).
    time.sleep(max(0.0, started + 25 - time.time()))
    text = _scrape()
    assert {s["kind"] for s in _samples(text, "ray_v4d_kv_pages_in_use")} >= {"csa"}
    assert [s["__value__"] for s in _samples(text, "ray_v4d_replica_ready")] == [1]
