"""Devices of a pool (no Ray started): the claims each replica makes, what `v4d serve` declares, and
the torch device a replica picks."""

from dataclasses import replace

import pytest
import torch
from helpers.opspecs import tiny_spec

from v4d.operator.planner import plan
from v4d.serving.experts import pool_actor_options
from v4d.serving.plan import Plan, PoolPlan
from v4d.serving.runtime.device import claims_at_max, node_resources, pair_backend, ray_options, torch_device


def _pool(name: str, vendor: str, resource: str, devices: int) -> PoolPlan:
    return PoolPlan(
        name,
        vendor,
        f"{vendor}.example/device",
        resource,
        devices_per_node=8,
        device_memory_gib=64.0,
        nodes=1,
        devices=devices,
        roles=["attention", "experts"],
    )


def _plan() -> Plan:
    p = plan(tiny_spec(), name="devices")
    engine = replace(p.engine, pool="h200", max_replicas=3, devices_per_replica=4)
    shards = [replace(p.shards[0], name=f"experts-ascend-{i}", pool="ascend") for i in range(3)]
    return replace(
        p,
        pools=[_pool("h200", "nvidia", "GPU", 10), _pool("ascend", "ascend", "NPU", 3)],
        engine=engine,
        shards=[*shards, replace(p.shards[0], name="experts-h200-0", pool="h200")],
    )


PLAN = _plan()


def test_claims_per_vendor():
    assert ray_options(PLAN.pools[0], 4) == {"num_gpus": 4}
    assert ray_options(PLAN.pools[1], 1) == {"resources": {"NPU": 1}}
    assert ray_options(PLAN.pools[0], 0) == {}
    engine = pool_actor_options(PLAN, "h200", devices=4)
    assert engine == {"num_cpus": 0.1, "label_selector": {"v4d.dev/pool": "h200"}, "num_gpus": 4}
    assert pool_actor_options(PLAN, "ascend", devices=1)["resources"] == {"NPU": 1}


def test_local_nodes_declare_what_replicas_can_claim():
    assert claims_at_max(PLAN, "h200") == 3 * 4 + 1
    assert node_resources(PLAN, "h200") == {"num_gpus": 13}  # more than the 10 planned: max scale
    assert node_resources(PLAN, "ascend") == {"resources": {"NPU": 3}}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_torch_device_falls_back_to_the_cpu():
    assert torch_device("nvidia") == torch.device("cpu")
    assert torch_device("ascend") == torch.device("cpu")  # no torch_npu here


def test_bound_deployments_take_their_delays_and_timeout_from_the_plan():
    """Binding needs no cluster: the shard and engine options are the plan's, with no defaults of their own."""
    from v4d.serving.engine.server import bind_engine
    from v4d.serving.experts import bind_shards

    p = plan(tiny_spec(), name="bound")
    p = replace(
        p,
        engine=replace(p.engine, upscale_delay_s=7.0, downscale_delay_s=123.0),
        serving=replace(p.serving, request_timeout_s=77.0),
    )
    shards = bind_shards(p, "/ckpt")
    assert list(shards) == [s.name for s in p.shards]
    shard = next(iter(shards.values()))._bound_deployment._deployment_config
    assert shard.autoscaling_config.policy.policy_kwargs["downscale_delay_s"] == 123.0
    assert shard.autoscaling_config.policy.policy_kwargs["upscale_delay_s"] == 7.0
    assert shard.autoscaling_config.max_replicas == p.engine.max_replicas
    engine = bind_engine(p, "/ckpt", shards)._bound_deployment
    assert engine._deployment_config.graceful_shutdown_timeout_s == 77.0
    kwargs = engine._deployment_config.autoscaling_config.policy.policy_kwargs
    assert kwargs["downscale_delay_s"] == 123.0 and kwargs["labels"]["deployment"] == "bound"
    assert engine.ray_actor_options["label_selector"] == {"v4d.dev/pool": p.engine.pool}


@pytest.mark.parametrize(
    ("a", "b", "want"),
    [
        ("cuda", "cuda", "nccl"),
        (torch.device("cuda", 0), "cuda:1", "nccl"),
        ("npu", "npu", "hccl"),
        ("cuda", "npu", "gloo"),
        ("npu", "cuda", "gloo"),  # NCCL and HCCL do not talk to each other
        ("cuda", "cpu", "gloo"),
        ("cpu", "npu", "gloo"),
        ("cpu", "cpu", "gloo"),
    ],
)
def test_pair_backend_matches_both_ends_devices(a, b, want):
    assert pair_backend(a, b) == want


@pytest.mark.parametrize(
    ("backend", "device", "want"),
    [
        ("nccl", "cuda", "cuda"),
        ("gloo", "cuda", "cpu"),
        ("gloo", "npu", "cpu"),
        ("gloo", "cpu", "cpu"),
    ],  # "npu" parses only with torch_npu
)
def test_pair_buffers_live_on_the_device_only_on_device_pairs(backend, device, want):
    from v4d.serving.runtime.channels import pair_device

    assert pair_device(backend, device).type == want


def test_device_pairs_are_off_unless_switched_on(monkeypatch):
    from v4d.serving.runtime.channels import DEVICE_PAIRS_ENV, device_pairs

    monkeypatch.delenv(DEVICE_PAIRS_ENV, raising=False)
    assert not device_pairs()
    monkeypatch.setenv(DEVICE_PAIRS_ENV, "1")
    assert device_pairs()
