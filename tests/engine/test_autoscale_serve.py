"""The KV-pressure policy driving a real Serve deployment: up, then down after the stabilization window."""

import time

import pytest
from ray import serve
from ray.experimental import internal_kv

from v4d.serving.autoscale import (
    KV_UTILIZATION,
    NUM_WAITING,
    KVPressurePolicy,
    autoscaling_config,
)
from v4d.serving.decision_publish import read_decisions

pytestmark = pytest.mark.ray

APP = "kv-policy"


def replicas(app, name="Load"):
    return serve.status().applications[app].deployments[name].replica_states.get("RUNNING", 0)


def wait_for(cond, timeout=30):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.2)
    return False


def test_policy_scales_engines_up_then_down_and_records(serve_instance):
    class Load:  # defined here so Ray pickles it by value (replicas cannot import test modules)
        """Reports whatever KV utilization the test puts in Ray's internal KV."""

        def record_autoscaling_stats(self):
            raw = internal_kv._internal_kv_get("test/kv", namespace="v4d-test")
            return {KV_UTILIZATION: float(raw or 0), NUM_WAITING: 0.0}

    cfg = autoscaling_config(
        KVPressurePolicy,
        1,
        2,
        1,
        interval_s=0.5,
        target_kv_utilization=0.7,
        target_waiting=4,
        upscale_delay_s=1.0,
        downscale_delay_s=3.0,
        labels={"model": "m", "deployment": "d", "pool": "gpu-a", "vendor": "nvidia"},
    )
    dep = serve.deployment(Load, name="Load", ray_actor_options={"num_cpus": 0.1}, autoscaling_config=cfg)
    serve.run(dep.bind(), name=APP, route_prefix=None)
    try:
        assert replicas(APP) == 1
        internal_kv._internal_kv_put("test/kv", "0.95", namespace="v4d-test")
        t0 = time.monotonic()
        assert wait_for(lambda: replicas(APP) == 2), "no scale-up"
        assert time.monotonic() - t0 >= 1.0  # not before the upscale delay
        internal_kv._internal_kv_put("test/kv", "0.0", namespace="v4d-test")
        t1 = time.monotonic()
        assert wait_for(lambda: replicas(APP) == 1), "no scale-down"
        assert time.monotonic() - t1 >= 3.0  # not before the downscale delay
        decisions = read_decisions(APP)
        assert [(d["from"], d["to"], d["direction"]) for d in decisions] == [(1, 2, "up"), (2, 1, "down")]
        assert decisions[0]["kv_max"] >= 0.95 and decisions[0]["deployment"] == "Load"
        assert decisions[1]["kv_max"] == 0.0 and decisions[1]["time"] > decisions[0]["time"]
    finally:
        serve.delete(APP)
