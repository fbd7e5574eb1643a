"""Devices of a pool: what a replica claims from Ray and the torch device it computes on.

The plan gives each pool a vendor and the Ray resource its nodes declare (`ray_resource`: "GPU" on
NVIDIA pools, whose KubeRay worker groups start Ray with their GPUs; "NPU" on Ascend pools, whose
worker groups declare `resources: {"NPU": n}`). An engine replica claims the plan's
`devices_per_replica` of its pool, an expert shard one device. Ray then sets the visible devices
of the actor (CUDA_VISIBLE_DEVICES / ASCEND_RT_VISIBLE_DEVICES), so the replica's device is index 0.
`v4d serve` declares the same resources on its labelled local nodes (`node_resources`), so claims
and placement are exercised without accelerators; the replica then runs on the CPU.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from v4d.serving.plan import Plan, PoolPlan


def ray_options(pool: PoolPlan, devices: int) -> dict[str, Any]:
    """Ray actor options claiming `devices` accelerators of `pool`."""
    if devices <= 0:
        return {}
    resource = pool.ray_resource
    if resource == "GPU":
        return {"num_gpus": devices}
    return {"resources": {resource: devices}}


def claims_at_max(plan: Plan, pool: str) -> int:
    """Devices the plan's replicas on `pool` claim at most: its shards, one each, plus the engine's
    `max_replicas x devices_per_replica` when the engine runs there."""
    eng = plan.engine
    engine = eng.max_replicas * eng.devices_per_replica if eng.pool == pool else 0
    return engine + sum(1 for s in plan.shards if s.pool == pool)


def node_resources(plan: Plan, pool: str) -> dict[str, Any]:
    """`Cluster.add_node` keyword arguments declaring a pool's devices on its one local node: as
    many as the plan uses or its replicas can claim at max scale (KubeRay adds nodes for those)."""
    spec = plan.pool(pool)
    return ray_options(spec, max(spec.devices, claims_at_max(plan, pool)))


def pair_backend(a: str | torch.device, b: str | torch.device) -> str:
    """The process-group backend an engine <-> shard pair on devices `a` and `b` needs: "nccl" when
    both are CUDA, "hccl" (torch_npu) when both are Ascend NPUs, else "gloo" through host memory
    (NCCL and HCCL do not talk to each other; a CPU end has no device link)."""
    ta, tb = (str(d).split(":")[0] for d in (a, b))  # not torch.device(): "npu" parses only with torch_npu
    if ta == tb == "cuda":
        return "nccl"
    if ta == tb == "npu":
        return "hccl"
    return "gloo"


def npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401  (registers the "npu" device with torch)

    return bool(torch.npu.is_available())


def torch_device(vendor: str) -> torch.device:
    """The device a replica of a `vendor` pool computes on: CUDA when torch sees one (nvidia), the
    Ascend NPU through torch_npu when it is importable (ascend; torch reference ops), else the CPU."""
    if vendor == "nvidia" and torch.cuda.is_available():
        return torch.device("cuda", 0)
    if vendor == "ascend" and npu_available():
        return torch.device("npu", 0)
    return torch.device("cpu")
