"""Serving metric catalogue and recorder (`ray.util.metrics`).

The catalogue is the single source of metric names: dashboards, recording rules and the docs table
are generated from it, so names here are a stable contract. vLLM names are used where a concept
exists in vLLM, so KubeRay/vLLM dashboards apply unchanged.

Naming: the contract name (`vllm:kv_cache_usage_perc`) is what users know from vLLM. Ray 2.60
silently discards metric names containing ':' (and warns they will become an error), so each
metric is registered with ':' -> '_' and Ray exports it with a `ray_` prefix: counters registered as
`vllm_prompt_tokens` are exported as `ray_vllm_prompt_tokens_total` - exactly the series
Ray-wrapped vLLM exports. `MetricSpec.exported` is the name to query in Prometheus.

Ray is imported only in the process that records (the first `set`/`inc`/`observe`), so importing
this module stays cheap for the operator, the dashboard generator and the docs.
"""

from __future__ import annotations

import atexit
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

from v4d.serving.plan import Plan

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

# Every serving metric carries these tags; the recorder fills them from its defaults.
BASE_TAGS: tuple[str, ...] = ("model", "deployment", "role", "pool", "vendor", "replica")

# Roles a recorder can take (the `role` label); "autoscaler" is the KV-pressure policy in the Serve
# controller, its `pool` the engine pool it scales.
ROLES: tuple[str, ...] = ("ingress", "engine", "experts", "autoscaler")

# vLLM's bucket boundaries, so quantiles compare with vLLM deployments.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
REQUEST_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


@dataclass(frozen=True)
class MetricSpec:
    """One catalogue entry.

    `attr` is the recorder attribute (`ServingMetrics(...).kv_cache_usage`); `tags` are the tag keys
    beyond the base ones; `values` lists the bounded values of a tag, which `ServingMetrics.ready()`
    zero-initialises so rates exist before the first event; `recorded_by` names the roles that
    record it (docs, and which counters a role zero-initialises).
    """

    name: str
    kind: str
    help: str
    attr: str = ""
    tags: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    recorded_by: tuple[str, ...] = ()
    values: dict[str, tuple[str, ...]] = field(default_factory=dict)
    base_tags: tuple[str, ...] = BASE_TAGS
    prefix: str = "ray_"

    @property
    def registered(self) -> str:
        """The name handed to the metrics library (':' -> '_', counters without `_total`)."""
        name = self.name.replace(":", "_")
        return name.removesuffix("_total") if self.kind == COUNTER else name

    @property
    def exported(self) -> str:
        """The Prometheus series name (histograms add `_bucket`, `_sum`, `_count`)."""
        return self.prefix + self.registered + ("_total" if self.kind == COUNTER else "")

    @property
    def all_tags(self) -> tuple[str, ...]:
        return self.base_tags + self.tags


def _spec(name: str, kind: str, help: str, attr: str, by: str, **kw: Any) -> MetricSpec:
    return MetricSpec(name=name, kind=kind, help=help, attr=attr, recorded_by=tuple(by.split()), **kw)


FINISHED_REASONS = ("stop", "length", "abort")
REJECT_REASONS = ("queue_full", "kv_capacity")
ERROR_KINDS = (
    "bad_request",
    "unauthorized",
    "not_found",
    "context_too_long",
    "shard_unavailable",
    "unavailable",
    "timeout",
    "internal",
)
DIRECTIONS = ("up", "down")
KV_PAGE_KINDS = ("csa", "hca", "indexer")

SERVING_METRICS: tuple[MetricSpec, ...] = (
    # --- vLLM-compatible engine metrics ---
    _spec(
        "vllm:kv_cache_usage_perc",
        GAUGE,
        "KV-cache usage of the engine replica, 0-1 (pages in use / pages).",
        "kv_cache_usage",
        "engine",
    ),
    _spec(
        "vllm:num_requests_running",
        GAUGE,
        "Requests in the running batch of the engine replica.",
        "requests_running",
        "engine",
    ),
    _spec(
        "vllm:num_requests_waiting",
        GAUGE,
        "Requests queued in the engine replica, not yet scheduled.",
        "requests_waiting",
        "engine",
    ),
    _spec(
        "vllm:time_to_first_token_seconds",
        HISTOGRAM,
        "Time from request arrival to its first output token.",
        "ttft",
        "engine",
        buckets=TTFT_BUCKETS,
    ),
    _spec(
        "vllm:inter_token_latency_seconds",
        HISTOGRAM,
        "Time between consecutive output tokens of a request.",
        "itl",
        "engine",
        buckets=ITL_BUCKETS,
    ),
    _spec(
        "vllm:e2e_request_latency_seconds",
        HISTOGRAM,
        "Time from request arrival to its last token.",
        "e2e_latency",
        "engine",
        buckets=REQUEST_BUCKETS,
    ),
    _spec(
        "vllm:request_queue_time_seconds",
        HISTOGRAM,
        "Time a request waited before its first schedule.",
        "queue_time",
        "engine",
        buckets=REQUEST_BUCKETS,
    ),
    _spec("vllm:prompt_tokens_total", COUNTER, "Prompt tokens prefilled.", "prompt_tokens", "engine"),
    _spec("vllm:generation_tokens_total", COUNTER, "Output tokens generated.", "generation_tokens", "engine"),
    _spec(
        "vllm:num_preemptions_total", COUNTER, "Running requests preempted to free KV pages.", "preemptions", "engine"
    ),
    _spec(
        "vllm:request_success_total",
        COUNTER,
        "Finished requests by finish reason.",
        "request_success",
        "engine",
        tags=("finished_reason",),
        values={"finished_reason": FINISHED_REASONS},
    ),
    # --- V4-specific ---
    _spec(
        "v4d:kv_pages_in_use",
        GAUGE,
        "Compressed KV pages in use (128 positions each) by page kind.",
        "kv_pages_in_use",
        "engine",
        tags=("kind",),
    ),
    _spec(
        "v4d:kv_state_slots_in_use",
        GAUGE,
        "Per-request state slots (window ring + compressor tails) in use.",
        "kv_state_slots_in_use",
        "engine",
    ),
    _spec(
        "v4d:kv_cache_usage_target",
        GAUGE,
        "Target KV-cache usage the autoscaler holds the engines at, 0-1.",
        "kv_cache_usage_target",
        "engine",
    ),
    _spec(
        "v4d:replica_ready",
        GAUGE,
        "1 while this replica is serving (sum = ready replicas per role and pool).",
        "replica_ready",
        "ingress engine experts",
    ),
    _spec(
        "v4d:expert_tokens_total",
        COUNTER,
        "Tokens routed to the experts of a shard, per MoE layer.",
        "expert_tokens",
        "experts",
        tags=("shard", "layer"),
    ),
    _spec(
        "v4d:expert_balance_max_over_mean",
        GAUGE,
        "Expert-load balance across shards: max/mean tokens (1 = even).",
        "expert_balance",
        "engine",
    ),
    _spec(
        "v4d:expert_redundant_copies",
        GAUGE,
        "Redundant physical expert copies placed by EPLB.",
        "expert_redundant_copies",
        "engine",
    ),
    _spec(
        "v4d:requests_rejected_total",
        COUNTER,
        "Requests refused with HTTP 429 (load shedding), by reason.",
        "requests_rejected",
        "ingress engine",
        tags=("reason",),
        values={"reason": REJECT_REASONS},
    ),
    _spec(
        "v4d:request_errors_total",
        COUNTER,
        "Requests failed with an error (HTTP 4xx/5xx other than 429), by kind.",
        "request_errors",
        "ingress engine",
        tags=("kind",),
        values={"kind": ERROR_KINDS},
    ),
    _spec(
        "v4d:autoscale_decisions_total",
        COUNTER,
        "Engine scale decisions taken by the KV-pressure policy.",
        "autoscale_decisions",
        "autoscaler",
        tags=("direction",),
        values={"direction": DIRECTIONS},
    ),
    _spec(
        "v4d:autoscale_target_replicas",
        GAUGE,
        "Engine replicas the autoscaler asks for (within min/max).",
        "autoscale_target_replicas",
        "autoscaler",
    ),
    _spec(
        "v4d:autoscale_desired_replicas",
        GAUGE,
        "Engine replicas the KV-pressure policy wants before the max bound (> target = capacity limited).",
        "autoscale_desired_replicas",
        "autoscaler",
    ),
    _spec(
        "v4d:autoscale_max_replicas",
        GAUGE,
        "Upper bound on engine replicas (spec.engine.maxReplicas).",
        "autoscale_max_replicas",
        "autoscaler",
    ),
)

BY_ATTR: dict[str, MetricSpec] = {m.attr: m for m in SERVING_METRICS}
BY_NAME: dict[str, MetricSpec] = {m.name: m for m in SERVING_METRICS}

# One Ray metric object per name per process (Ray aggregates by tags, not by object).
_RAY_METRICS: dict[str, Any] = {}

# Ray 2.60's metrics agent evicts a gauge series ~2 export intervals after its last set() (so series of
# dead workers age out). A value set once (a target, a ready flag, 0 % KV on an idle engine) would
# vanish, so every gauge set in this process is re-set each KEEPALIVE_S until `clear()`ed; when the
# process dies its series age out, which is what `replica_ready` relies on.
KEEPALIVE_S = 1.0
_LIVE_GAUGES: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[MetricSpec, dict[str, str], float]] = {}
_LIVE_LOCK = threading.Lock()
_keepalive_thread: threading.Thread | None = None


_keepalive_stop = threading.Event()


def _keepalive() -> None:
    import ray

    while not _keepalive_stop.wait(KEEPALIVE_S):
        if not ray.is_initialized():  # after ray.shutdown() there is no exporter to keep anything alive in
            continue
        with _LIVE_LOCK:  # held while setting, so a concurrent set() never gets overwritten by an old value
            for spec, tags, value in _LIVE_GAUGES.values():
                _ray_metric(spec).set(value, tags=tags)


def _stop_keepalive() -> None:
    """At exit, before the interpreter and Ray's C++ metrics are torn down: a daemon thread still
    recording into them then crashes the process (SIGSEGV) after its work is done."""
    _keepalive_stop.set()
    if _keepalive_thread is not None:
        _keepalive_thread.join(timeout=5 * KEEPALIVE_S)


def _set_gauge(spec: MetricSpec, tags: dict[str, str], value: float | None) -> None:
    """Set (and keep alive) a gauge series; None stops keeping it alive."""
    global _keepalive_thread
    key = (spec.name, tuple(sorted(tags.items())))
    with _LIVE_LOCK:
        if value is None:
            _LIVE_GAUGES.pop(key, None)
            return
        _ray_metric(spec).set(value, tags=tags)
        _LIVE_GAUGES[key] = (spec, tags, value)
        if _keepalive_thread is None:
            _keepalive_thread = threading.Thread(target=_keepalive, name="v4d-gauge-keepalive", daemon=True)
            _keepalive_thread.start()
            atexit.register(_stop_keepalive)  # runs before Ray's own atexit shutdown (registered earlier)


def _ray_metric(spec: MetricSpec) -> Any:
    metric = _RAY_METRICS.get(spec.name)
    if metric is None:
        from ray.util import metrics as rm  # the recording process only

        args = (spec.registered, spec.help)
        if spec.kind == COUNTER:
            metric = rm.Counter(*args, tag_keys=spec.all_tags)
        elif spec.kind == GAUGE:
            metric = rm.Gauge(*args, tag_keys=spec.all_tags)
        else:
            metric = rm.Histogram(*args, boundaries=list(spec.buckets), tag_keys=spec.all_tags)
        _RAY_METRICS[spec.name] = metric
    return metric


class Recorder:
    """Records one catalogue metric with the owner's default tags plus the metric's own tags."""

    def __init__(self, spec: MetricSpec, owner: ServingMetrics):
        self.spec = spec
        self._owner = owner

    def _tags(self, tags: dict[str, Any] | None) -> dict[str, str]:
        tags = tags or {}
        if set(tags) != set(self.spec.tags):
            raise ValueError(
                f"metric {self.spec.name}: tags must be exactly {sorted(self.spec.tags)}, got {sorted(tags)}"
            )
        return {**self._owner.default_tags(), **{k: str(v) for k, v in tags.items()}}

    def _check(self, kind: str) -> None:
        if self.spec.kind != kind:
            raise TypeError(f"metric {self.spec.name} is a {self.spec.kind}, not a {kind}")

    def set(self, value: float, tags: dict[str, Any] | None = None) -> None:
        """Set a gauge; the value is re-exported every KEEPALIVE_S until changed or cleared."""
        self._check(GAUGE)
        _set_gauge(self.spec, self._tags(tags), float(value))

    def clear(self, tags: dict[str, Any] | None = None) -> None:
        """Stop exporting a gauge series (it ages out of Ray's exporter within seconds)."""
        self._check(GAUGE)
        _set_gauge(self.spec, self._tags(tags), None)

    def inc(self, value: float = 1.0, tags: dict[str, Any] | None = None) -> None:
        self._check(COUNTER)
        if value < 0:
            raise ValueError(f"metric {self.spec.name}: counters only go up, got {value}")
        if value > 0:  # Ray rejects inc(0)
            _ray_metric(self.spec).inc(float(value), tags=self._tags(tags))

    def observe(self, value: float, tags: dict[str, Any] | None = None) -> None:
        self._check(HISTOGRAM)
        _ray_metric(self.spec).observe(float(value), tags=self._tags(tags))

    def zero(self, tags: dict[str, Any] | None = None) -> None:
        """Export a counter at 0 so rate() has a series before the first event."""
        self._check(COUNTER)
        # Ray's public inc() refuses 0; _record is the call inc() makes after its check.
        _ray_metric(self.spec)._record(0.0, tags=self._tags(tags))


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not inside a Serve replica (driver, controller, plain actor)
        return ""


def plan_labels(plan: Plan, pool: str) -> dict[str, str]:
    """Metric labels (model, deployment, pool, vendor) for a component running in `pool` ("": the head node)."""
    vendor = plan.pool(pool).vendor if pool else ""
    return {"model": plan.served_name, "deployment": plan.name, "pool": pool, "vendor": vendor}


class ServingMetrics:
    """Default tags of one recording process plus one `Recorder` per catalogue entry.

    Usage in an engine replica::

        m = ServingMetrics(model="v4-tiny", deployment="demo", role="engine", pool="gpu-a", vendor="nvidia")
        m.ready()                                   # replica_ready=1, zero-init this role's counters
        m.kv_cache_usage.set(0.42)
        m.request_success.inc(tags={"finished_reason": "stop"})
        m.ttft.observe(0.031)

    `replica` defaults to the Serve replica id (empty outside a replica).
    """

    def __init__(
        self, *, model: str, deployment: str, role: str, pool: str = "", vendor: str = "", replica: str | None = None
    ):
        if role not in ROLES:
            raise ValueError(f"role must be one of {list(ROLES)}, got {role!r}")
        self.model, self.deployment, self.role, self.pool, self.vendor = model, deployment, role, pool, vendor
        self._replica = replica
        self._recorders: dict[str, Recorder] = {}

    def default_tags(self) -> dict[str, str]:
        if self._replica is None:
            self._replica = _replica_id()
        return {
            "model": self.model,
            "deployment": self.deployment,
            "role": self.role,
            "pool": self.pool,
            "vendor": self.vendor,
            "replica": self._replica,
        }

    def __getattr__(self, attr: str) -> Recorder:
        spec = BY_ATTR.get(attr)
        if spec is None:
            raise AttributeError(f"no serving metric {attr!r}; known: {sorted(BY_ATTR)}")
        recorders = self.__dict__["_recorders"]
        if attr not in recorders:
            recorders[attr] = Recorder(spec, self)
        return recorders[attr]

    def ready(self) -> None:
        """Mark a replica serving and zero-initialise the bounded counters its role records."""
        if self.role in BY_ATTR["replica_ready"].recorded_by:
            self.replica_ready.set(1)
        for spec in SERVING_METRICS:
            if spec.kind != COUNTER or self.role not in spec.recorded_by:
                continue
            if set(spec.tags) - set(spec.values):
                continue  # unbounded tags (shard, layer): the first event creates the series
            keys = list(spec.values)
            for combo in itertools.product(*(spec.values[k] for k in keys)):
                getattr(self, spec.attr).zero(dict(zip(keys, combo, strict=True)))
