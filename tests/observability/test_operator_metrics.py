"""Operator metrics: recorded through the API and scraped over real HTTP."""

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from v4d.operator.metrics import OPERATOR_METRICS, OperatorMetrics, start_metrics_server

PORT = 8391


def _scrape(port: int) -> dict[str, list]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


class Boom(Exception):
    pass


def test_operator_metrics_are_served_with_catalogue_names():
    m = OperatorMetrics()
    with m.reconcile():
        m.api_write("RayService")
        m.api_write("ConfigMap")
    with pytest.raises(Boom), m.reconcile():
        raise Boom("apiserver said no")
    m.retry()
    m.set_objects({"Ready": 2, "Pending": 1})
    m.set_objects({"Ready": 3})
    server = start_metrics_server(m, PORT, addr="127.0.0.1")
    try:
        s = _scrape(PORT)
    finally:
        server.shutdown()
        server.server_close()

    results = {labels["result"]: v for labels, v in s["v4d_operator_reconciles_total"]}
    assert results == {"success": 1, "error": 1, "retry": 1}
    assert s["v4d_operator_reconcile_errors_total"] == [({"reason": "Boom"}, 1)]
    assert s["v4d_operator_reconcile_duration_seconds_count"] == [({}, 2)]
    assert dict((lb["kind"], v) for lb, v in s["v4d_operator_api_writes_total"]) == {"RayService": 1, "ConfigMap": 1}
    assert dict((lb["phase"], v) for lb, v in s["v4d_operator_objects"]) == {"Ready": 3, "Pending": 0}
    for spec in OPERATOR_METRICS:
        series = spec.exported + ("_count" if spec.kind == "histogram" else "")
        assert series in s, f"{spec.name} not exported as {series}"


def test_registries_are_private():
    a, b = OperatorMetrics(), OperatorMetrics()
    a.api_write("RayService")
    assert b.registry.get_sample_value("v4d_operator_api_writes_total", {"kind": "RayService"}) is None
    assert a.registry.get_sample_value("v4d_operator_api_writes_total", {"kind": "RayService"}) == 1
