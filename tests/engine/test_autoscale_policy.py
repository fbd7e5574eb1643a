"""The autoscaling policies as pure functions of synthetic Serve contexts."""

from types import SimpleNamespace

import pytest

from v4d.serving.autoscale import (
    EXPERT_TOKENS_PER_S,
    KV_UTILIZATION,
    NUM_WAITING,
    ExpertLoadPolicy,
    KVPressurePolicy,
    kv_desired,
    kv_slope,
    stabilize,
)


def ctx(target, kv=None, waiting=None, now=0.0, state=None, lo=1, hi=4, metrics=None):
    replicas = [f"r{i}" for i in range(target)]
    metrics = metrics or {
        KV_UTILIZATION: dict(zip(replicas, kv or [], strict=False)),
        NUM_WAITING: dict(zip(replicas, waiting or [0] * target, strict=False)),
    }
    return SimpleNamespace(
        target_num_replicas=target,
        current_num_replicas=target,
        running_replicas=replicas,
        aggregated_metrics=metrics,
        policy_state=state or {},
        current_time=now,
        capacity_adjusted_min_replicas=lo,
        capacity_adjusted_max_replicas=hi,
        app_name="app",
        deployment_name="engine",
    )


def test_kv_desired_uses_the_hottest_replica_and_the_queue():
    # mean 0.5 would say "2 is enough"; the hot replica at 0.95 asks for 3
    assert kv_desired(2, [0.95, 0.05], [0, 0], 0.7, 4)[0] == 3
    assert kv_desired(2, [0.3, 0.3], [0, 0], 0.7, 4)[0] == 1
    n, figures = kv_desired(1, [0.2], [9], 0.7, 4)
    assert n == 3 and figures["by_queue"] == 3 and figures["waiting"] == 9


def test_stabilize_up_after_delay_down_after_longer_delay_to_peak():
    t, s = stabilize({}, 0.0, 1, 3, 5, 30)
    assert t == 1 and s["direction"] == "up"
    t, s = stabilize(s, 4.0, 1, 3, 5, 30)
    assert t == 1
    t, s = stabilize(s, 5.0, 1, 3, 5, 30)
    assert (t, s) == (3, {})
    t, s = stabilize({}, 10.0, 3, 1, 5, 30)
    t, s = stabilize(s, 20.0, 3, 2, 5, 30)  # demand came back a bit: go down only to 2
    t, s = stabilize(s, 40.0, 3, 1, 5, 30)
    assert t == 2
    # a flip of direction restarts the window
    _, s = stabilize({}, 0.0, 2, 1, 5, 30)
    _, s = stabilize(s, 29.0, 2, 3, 5, 30)
    assert s["direction"] == "up" and s["since"] == 29.0


def test_kv_policy_scales_up_then_down_with_stabilization_and_records():
    p = KVPressurePolicy(target_kv_utilization=0.7, target_waiting=4, upscale_delay_s=2, downscale_delay_s=10)
    n, state = p(ctx(1, kv=[0.95], now=100))
    assert n == 1 and state["pending"]["direction"] == "up"
    n, state = p(ctx(1, kv=[0.96], now=102, state=state))
    assert n == 2
    d = state["last_decision"]
    assert (d["from"], d["to"], d["direction"], d["kv_max"], d["deployment"]) == (1, 2, "up", 0.96, "engine")
    n, state = p(ctx(2, kv=[0.9, 0.9], now=103, state=state))  # still hot: up to 3 after the delay
    n, state = p(ctx(2, kv=[0.9, 0.9], now=105, state=state))
    assert n == 3
    n, state = p(ctx(3, kv=[0.0, 0.0, 0.0], now=106, state=state))  # load gone: hold for 10 s
    assert n == 3
    n, state = p(ctx(3, kv=[0.0, 0.0, 0.0], now=115, state=state))
    assert n == 3
    n, state = p(ctx(3, kv=[0.0, 0.0, 0.0], now=116, state=state))
    assert n == 1 and state["last_decision"]["direction"] == "down"


def test_policy_respects_bounds_and_holds_without_metrics():
    p = KVPressurePolicy(upscale_delay_s=0, downscale_delay_s=0)
    assert p(ctx(2, kv=[1.0, 1.0], hi=3))[0] == 3
    assert p(ctx(2, kv=[0.0, 0.0], lo=2))[0] == 2
    assert p(ctx(2, metrics={}, state={"x": 1})) == (2, {"x": 1})


def test_expert_load_policy():
    p = ExpertLoadPolicy(target_tokens_per_s=100, upscale_delay_s=0, downscale_delay_s=0)
    c = ctx(1, metrics={EXPERT_TOKENS_PER_S: {"r0": 250.0}})
    n, state = p(c)
    assert n == 3 and state["last_decision"]["tokens_per_s"] == 250.0


def test_kv_slope_is_the_least_squares_trend():
    assert kv_slope([(0, 0.2), (10, 0.3), (20, 0.4)]) == pytest.approx(0.01)
    assert kv_slope([(5, 0.9)]) == 0.0 and kv_slope([(5, 0.1), (5, 0.9)]) == 0.0


def test_look_ahead_scales_before_saturation_on_a_rising_trend():
    """KV rising 1 %/s at 30-50 %: reacting to the current figure holds 1 replica; with a 60 s
    time-to-ready the projection (50 % + 60 %) crosses the 70 % target, so a second one is asked for now."""
    rising = [(100 + t, 0.3 + 0.01 * t) for t in range(0, 21, 2)]
    for ttr, expected in ((0.0, 1), (60.0, 2)):
        p = KVPressurePolicy(target_kv_utilization=0.7, time_to_ready_s=ttr, upscale_delay_s=0, downscale_delay_s=30)
        state, n = {}, 1
        for now, kv in rising:
            n, state = p(ctx(1, kv=[kv], now=now, state=state))
        assert n == expected
    d = state["last_decision"]
    assert d["kv_max"] < 0.7 < d["kv_projected"] and d["direction"] == "up"


def test_look_ahead_ignores_flat_or_falling_load_and_restarts_after_a_scale():
    p = KVPressurePolicy(target_kv_utilization=0.7, time_to_ready_s=120, upscale_delay_s=0, downscale_delay_s=600)
    state = {}
    for t in range(0, 30, 2):  # flat at 60 %: no trend, no scale
        n, state = p(ctx(2, kv=[0.6, 0.5], now=float(t), state=state))
    assert n == 2
    for t in range(30, 60, 2):  # falling: never projected below what is measured
        n, state = p(ctx(2, kv=[0.6 - 0.01 * (t - 30), 0.1], now=float(t), state=state))
    assert n == 2 and state["memory"]["kv"][-1][1] < 0.6
    # Samples taken at another replica count do not bend the trend at this one.
    n, state = p(ctx(3, kv=[0.4, 0.4, 0.4], now=60.0, state=state))
    assert [c for _, _, c in state["memory"]["kv"]] == [3]


def test_decide_has_no_side_effects_and_the_publisher_gets_each_decision():
    """`decide` is a function of the context; `__call__` hands each change of target to the publisher."""

    class Recorder:
        def __init__(self):
            self.published = []

        def publish(self, app, decision):
            self.published.append((app, decision))

    p = KVPressurePolicy(target_kv_utilization=0.7, upscale_delay_s=0, downscale_delay_s=0)
    p.publisher = Recorder()
    tick = p.decide(ctx(1, kv=[0.95], now=5.0))
    assert (tick.target, tick.wanted, tick.decision["to"]) == (2, 2, 2) and p.publisher.published == []
    assert p.decide(ctx(1, kv=[0.95], now=5.0)) == tick  # same context, same answer
    n, _ = p(ctx(1, kv=[0.95], now=5.0))
    assert n == 2 and p.publisher.published == [("app", tick.decision)]
    p(ctx(2, kv=[0.5, 0.5], now=6.0))  # no change of target: nothing published
    assert len(p.publisher.published) == 1
