"""Engine and expert shards as real Serve deployments: handle streaming equals the in-process model,
remote experts equal LocalExperts, errors cross the handle typed, shard failures never hang, metrics
reach Ray's Prometheus endpoint."""

import threading
import time
import urllib.request
from dataclasses import replace

import pytest
import ray
import torch
from ray import serve

from v4d.serving.checkpoint import make_checkpoint
from v4d.serving.config import TINY_FAST
from v4d.serving.decision_publish import read_decisions
from v4d.serving.engine.server import bind_engine
from v4d.serving.engine.transport import RemoteExperts, ServeTransport, SlotMap
from v4d.serving.errors import ContextTooLong, ShardUnavailable
from v4d.serving.experts import bind_shards, shard_app_builder
from v4d.serving.model.loader import load_model
from v4d.serving.plan import Balance, EnginePlan, ExpertCounts, KVPlan, Plan, PoolPlan, ServingPlan, ShardPlan
from v4d.serving.sizing import page_bytes, page_tokens, slot_bytes

from .reference import greedy

pytestmark = pytest.mark.ray

CFG = TINY_FAST
APP = "engine-test"
E, LAYERS = CFG.n_routed_experts, CFG.num_hidden_layers + CFG.num_nextn_predict_layers
# Shard "a" holds experts 0..11, "b" holds 8..15: 8..11 have a redundant copy on each.
SLOTS = {"experts-gpu-a-0": list(range(0, 12)), "experts-gpu-a-1": list(range(8, 16))}


def make_plan(weights: str) -> Plan:
    pool = PoolPlan(
        "gpu-a",
        "nvidia",
        "nvidia.com/gpu",
        "GPU",
        devices_per_node=8,
        device_memory_gib=141.0,
        nodes=1,
        devices=3,
        roles=["attention", "experts"],
    )
    engine = EnginePlan(
        pool="gpu-a",
        devices_per_replica=1,
        replicas=1,
        min_replicas=1,
        max_replicas=1,
        kv_budget_bytes=5 * slot_bytes(CFG, "fp32") + 4 * page_bytes(CFG, "fp32"),
        capacity_tokens=0,
        page_tokens=page_tokens(CFG),
        max_num_seqs=4,
        max_batch_tokens=64,
        max_queue=4,
        target_kv_utilization=0.7,
        upscale_delay_s=0,
        downscale_delay_s=5,
        kv_format="fp32",
    )
    shards = [ShardPlan(n, "gpu-a", i, [s] * LAYERS, weight_bytes=0) for i, (n, s) in enumerate(SLOTS.items())]
    return Plan(
        name="tiny",
        served_name="v4-tiny-fast",
        model="v4-tiny-fast",
        config=CFG.to_dict(),
        weights_uri=weights,
        max_context_tokens=512,
        pools=[pool],
        engine=engine,
        shards=shards,
        experts=ExpertCounts(logical=E, physical=20, redundant=4),
        balance=Balance(1.0),
        kv=KVPlan(0.0, 0),
        serving=ServingPlan(),
    )


@pytest.fixture(scope="module")
def app(serve_instance, tmp_path_factory):
    """Each shard as its own Serve app (named after it), the engine app on top of them.
    (Shards bound into the engine's app are what `v4d serve` runs: tests/serving.)"""
    torch.set_num_threads(1)
    weights = str(make_checkpoint(CFG, tmp_path_factory.mktemp("ckpt")))
    plan = make_plan(weights)
    for name in SLOTS:
        serve.run(shard_app_builder({"plan": plan.to_dict(), "shard": name}), name=name, route_prefix=None)
    engine = serve.run(bind_engine(plan, weights, shard_apps=True), name=APP, route_prefix=None)
    handles = {n: serve.get_deployment_handle(n, n) for n in SLOTS}
    yield plan, load_model(weights, progress=False), engine, handles
    for name in [APP, *SLOTS]:
        if name in serve.status().applications:
            serve.delete(name)


def stream(engine, prompt, n):
    req = {"request_id": f"r{time.monotonic_ns()}", "prompt_token_ids": prompt, "max_tokens": n, "ignore_eos": True}
    tokens, last = [], None
    for item in engine.options(stream=True).generate.remote(req):
        tokens += item["token_ids"]
        last = item
    return tokens, last


def test_remote_experts_over_serve_equal_local_experts(app):
    plan, model, _, handles = app
    remote = RemoteExperts(SlotMap.from_shards(plan.shards), ServeTransport(handles))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, CFG.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(10)])
    w = torch.rand(10, 2, generator=g)
    for layer in (0, 3):
        torch.testing.assert_close(remote(layer, x, ids, w), model.experts(layer, x, ids, w), rtol=1e-5, atol=1e-5)
    assert remote.load["experts-gpu-a-0"] > 0 and remote.load["experts-gpu-a-1"] > 0


def test_engine_streams_the_in_process_greedy_output(app):
    _, model, engine, _ = app
    prompt = [(5 + 11 * i) % CFG.vocab_size for i in range(30)]
    tokens, last = stream(engine, prompt, 6)
    assert tokens == greedy(model, prompt, 6)
    assert last["finish_reason"] == "length" and last["num_output_tokens"] == 6
    stats = engine.stats.remote().result()
    assert stats["num_running"] == 0 and stats["capacity_tokens"] == 4 * 128
    # The engine reaches both shards over direct channels (Serve handles only before they formed).
    assert stats["expert_channels"] == {name: 1 for name in SLOTS}, stats
    with pytest.raises(ContextTooLong) as e:  # typed across the handle, with its fields
        stream(engine, prompt, 600)
    assert e.value.limit == 512


def test_engine_metrics_reach_the_prometheus_endpoint(app):
    port = ray.nodes()[0]["MetricsExportPort"]
    names = (
        "ray_vllm_kv_cache_usage_perc",
        "ray_vllm_num_requests_running",
        "ray_vllm_generation_tokens_total",
        "ray_vllm_time_to_first_token_seconds_bucket",
        "ray_v4d_kv_pages_in_use",
        "ray_v4d_expert_tokens_total",
    )
    body = ""
    for _ in range(60):  # metric kinds reach the export in different cycles: wait for all of them
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        if all(name in body for name in names):
            break
        time.sleep(1)
    for name in names:
        assert name in body, name
    assert 'role="engine"' in body and 'role="experts"' in body and 'pool="gpu-a"' in body


def test_deleting_the_engine_app_finishes_inflight_streams(app):
    _, model, engine, _ = app
    prompt = [(7 + 13 * i) % CFG.vocab_size for i in range(12)]
    req = {"request_id": "drain", "prompt_token_ids": prompt, "max_tokens": 8, "ignore_eos": True}
    items = iter(engine.options(stream=True).generate.remote(req))
    first = next(items)
    deleter = threading.Thread(target=serve.delete, args=(APP,))
    deleter.start()
    rest = list(items)
    deleter.join(timeout=120)
    assert first["token_ids"] + [t for item in rest for t in item["token_ids"]] == greedy(model, prompt, 8)
    assert rest[-1]["finish_reason"] == "length"
    assert APP not in serve.status().applications


def _kill_replica(deployment: str) -> None:
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == "serve" and f"#{deployment}#" in a["name"]:
            ray.kill(ray.get_actor(a["name"], namespace="serve"), no_restart=True)
            return
    raise LookupError(deployment)


def test_shard_failure_retries_on_a_copy_or_fails_fast(app):
    plan, model, _, handles = app
    remote = RemoteExperts(SlotMap.from_shards(plan.shards), ServeTransport(handles, timeout_s=4))
    x = torch.randn(6, CFG.hidden_size)
    w = torch.rand(6, 2)
    shared = torch.tensor([[8, 9], [10, 11]] * 3)  # experts with a copy on both shards
    only_a = torch.tensor([[0, 1]] * 6)  # experts only shard a holds
    _kill_replica("experts-gpu-a-0")
    t0 = time.monotonic()
    # Pairs of redundant experts always complete (on b if a's call fails or times out) ...
    torch.testing.assert_close(remote(1, x, shared, w), model.experts(1, x, shared, w), rtol=1e-5, atol=1e-5)
    # ... pairs with no other copy fail with ShardUnavailable, or complete once Serve has replaced
    # the replica; either way within the transport's timeout, never a hang.
    try:
        y = remote(1, x, only_a, w)
    except ShardUnavailable as e:
        assert "no live copy of expert" in str(e)
    else:
        torch.testing.assert_close(y, model.experts(1, x, only_a, w), rtol=1e-5, atol=1e-5)
    assert time.monotonic() - t0 < 30


def test_expert_shard_scales_on_its_token_load(app):
    """bind_shards' ExpertLoadPolicy in a live app: token load over the per-replica target adds a
    replica; when the load stops (10 s window) and the downscale delay (5 s) passes, it goes back."""
    plan, _, _, _ = app
    name = "experts-gpu-a-scaling"
    one = replace(plan, engine=replace(plan.engine, max_replicas=2), shards=[replace(plan.shards[0], name=name)])
    serve.run(bind_shards(one, plan.weights_uri, target_tokens_per_s=5.0)[name], name=name, route_prefix=None)
    handle = serve.get_deployment_handle(name, name)

    def running() -> int:
        return serve.status().applications[name].deployments[name].replica_states.get("RUNNING", 0)

    try:
        assert running() == 1
        x, ids, w = torch.randn(8, CFG.hidden_size), torch.tensor([[0, 1]] * 8), torch.rand(8, 2)
        deadline = time.monotonic() + 120  # a new replica loads its experts: slow on a loaded machine
        while running() < 2:  # 16 token-expert pairs a call: far over 5/s
            assert time.monotonic() < deadline, "no scale-up under token load"
            handle.compute.remote(1, x, ids, w).result()
            time.sleep(0.1)
        deadline = time.monotonic() + 120
        while running() > 1:
            assert time.monotonic() < deadline, "no scale-down once the load stopped"
            time.sleep(0.5)
        decisions = [(d["from"], d["to"]) for d in read_decisions(name)]
        assert decisions == [(1, 2), (2, 1)], decisions
        assert read_decisions(name)[0]["tokens_per_s"] > 5.0
    finally:
        serve.delete(name)
