"""One Ray + Serve instance for the engine's Serve tests (ports 8200 HTTP, 8201 metrics, 8202 on a retry)."""

import os

import pytest

from v4d.serving.names import POOL_LABEL

SERVE_PORT, METRICS_PORT = 8200, 8201


# Package scope: later test directories start Ray clusters of their own.
@pytest.fixture(scope="package")
def serve_instance():
    os.environ.update(
        RAY_AUTH_MODE="disabled",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        V4D_TRANSPORT_HOST="127.0.0.1",
    )
    import ray
    from ray import serve

    start = dict(
        num_cpus=2,
        num_gpus=4,  # stand-ins the replicas claim (engine 1 + a shard each); none are real here
        object_store_memory=300 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
        labels={POOL_LABEL: "gpu-a"},
        _metrics_export_port=METRICS_PORT,
        _temp_dir="/tmp/v4d-engine-ray",
        _system_config={"metrics_report_interval_ms": 1000},
    )
    try:
        ray.init(**start)
    except Exception:  # a raylet that misses its 30 s registration on a saturated machine: once more
        ray.shutdown()
        ray.init(**{**start, "_metrics_export_port": METRICS_PORT + 1})
    serve.start(http_options={"host": "127.0.0.1", "port": SERVE_PORT})
    yield serve
    serve.shutdown()
    ray.shutdown()
