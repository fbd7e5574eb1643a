"""Operator metric catalogue and recorder (`prometheus_client`, its own registry).

kopf exports no metrics, so the operator serves these on its own HTTP port. Names are a stable
contract; dashboards, rules and docs are generated from `OPERATOR_METRICS`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from v4d.serving.metrics import COUNTER, GAUGE, HISTOGRAM, MetricSpec

RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RESULTS = ("success", "error", "retry")


def _spec(name: str, kind: str, help: str, tags: tuple[str, ...] = (), **kw) -> MetricSpec:
    return MetricSpec(
        name=name, kind=kind, help=help, tags=tags, recorded_by=("operator",), base_tags=(), prefix="", **kw
    )


OPERATOR_METRICS: tuple[MetricSpec, ...] = (
    _spec(
        "v4d_operator_reconciles_total",
        COUNTER,
        "Reconciles of V4Deployments by result.",
        ("result",),
        values={"result": RESULTS},
    ),
    _spec(
        "v4d_operator_reconcile_errors_total", COUNTER, "Failed reconciles by reason (exception class).", ("reason",)
    ),
    _spec("v4d_operator_reconcile_duration_seconds", HISTOGRAM, "Time one reconcile took.", buckets=RECONCILE_BUCKETS),
    _spec("v4d_operator_objects", GAUGE, "V4Deployments known to the operator by status phase.", ("phase",)),
    _spec(
        "v4d_operator_api_writes_total",
        COUNTER,
        "Kubernetes API writes (create/patch/delete) by object kind.",
        ("kind",),
    ),
)


class OperatorMetrics:
    """The operator's metrics on a private `CollectorRegistry` (tests make one each)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        specs = {m.name: m for m in OPERATOR_METRICS}

        def make(name: str, cls: type, **kw):
            spec = specs[name]
            return cls(spec.registered, spec.help, spec.tags, registry=self.registry, **kw)

        self.reconciles = make("v4d_operator_reconciles_total", Counter)
        self.reconcile_errors = make("v4d_operator_reconcile_errors_total", Counter)
        self.reconcile_duration = make("v4d_operator_reconcile_duration_seconds", Histogram, buckets=RECONCILE_BUCKETS)
        self.objects = make("v4d_operator_objects", Gauge)
        self.api_writes = make("v4d_operator_api_writes_total", Counter)
        for result in RESULTS:  # rate() needs the series before the first event
            self.reconciles.labels(result=result)
        self._phases: set[str] = set()

    @contextmanager
    def reconcile(self) -> Iterator[None]:
        """Time one reconcile; an exception counts as an error (reason = its class) and re-raises.

        kopf's `TemporaryError`/`PermanentError` are both errors here; call `retry()` for a planned requeue.
        """
        start = time.perf_counter()
        try:
            yield
        except BaseException as exc:
            self.reconciles.labels(result="error").inc()
            self.reconcile_errors.labels(reason=type(exc).__name__).inc()
            raise
        else:
            self.reconciles.labels(result="success").inc()
        finally:
            self.reconcile_duration.observe(time.perf_counter() - start)

    def retry(self) -> None:
        self.reconciles.labels(result="retry").inc()

    def api_write(self, kind: str) -> None:
        self.api_writes.labels(kind=kind).inc()

    def set_objects(self, by_phase: dict[str, int]) -> None:
        """Set the object count of every phase; phases seen before and missing now drop to 0."""
        self._phases |= set(by_phase)
        for phase in self._phases:
            self.objects.labels(phase=phase).set(by_phase.get(phase, 0))


def start_metrics_server(metrics: OperatorMetrics, port: int, addr: str = "0.0.0.0") -> WSGIServer:
    """Serve `metrics` as Prometheus text on http://addr:port/metrics from a daemon thread.

    Returns the server; `server.shutdown()` stops it.
    """
    server, _thread = start_http_server(port, addr=addr, registry=metrics.registry)
    return server
