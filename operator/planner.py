"""The planner: V4Deployment spec + model config (+ expert-load statistics) -> Plan. Pure.

What it decides (attention-FFN disaggregation: attention/KV engines and expert shards are separate
Ray Serve deployments, each on the pool that suits it):
- attention replicas: devices per replica (fewest, a power of two within one node, that hold the
  dense weights plus one full-context sequence), the KV budget left after weights and the working
  reserve, and from it state slots, KV pages and the token capacity at the configured context;
- routed experts: slots per device from each pool's memory (a slot holds one expert in every MoE
  layer), how many devices of each expert pool to use (proportional to what each pool offers, or
  `parallelism.expertParallelSize` in total), slot counts per device proportional to capacity, and
  the slot -> logical expert map of every layer from the EPLB global policy (`eplb.place`).
Memory per device: deployed-format weights + a working reserve of RESERVE_FRACTION of the device
(activations, runtime and collective buffers, fragmentation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import ceil, floor
from typing import Any

import numpy as np

from v4d.operator import api, eplb
from v4d.operator.validate import parse_spec, resolve_model
from v4d.serving import sizing
from v4d.serving.config import ModelConfig
from v4d.serving.names import shard_name
from v4d.serving.plan import (
    Balance,
    EnginePlan,
    ExpertCounts,
    KVPlan,
    Plan,
    PoolPlan,
    RayResource,
    ServingPlan,
    ShardPlan,
    TransportPlan,
)
from v4d.serving.sizing import human_bytes

RESERVE_FRACTION = 0.10
# Transport assumptions (stated in `v4d plan` and status.plan): 400 Gb/s RDMA between devices of one
# vendor, 100 Gb/s Ethernet through host memory across vendors, a 50 ms decode step (20 tokens/s per
# stream), and a warning when cross-vendor transport takes over a quarter of that step.
DEVICE_LINK_GB_S = 50.0
HOST_LINK_GB_S = 12.5
STEP_MS = 50.0
CROSS_VENDOR_STEP_SHARE = 0.25
RAY_RESOURCE: dict[str, RayResource] = {"nvidia": "GPU", "ascend": "NPU"}
GiB = 2**30


class PlanError(ValueError):
    """The spec cannot be placed; `problems` says why, pool by pool."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def _usable(pool: api.PoolSpec) -> float:
    return pool.deviceMemoryGiB * GiB * (1 - RESERVE_FRACTION)


def _shape(pool: api.PoolSpec) -> str:
    return (
        f"{pool.maxNodes} node{'s' if pool.maxNodes > 1 else ''} x {pool.devicesPerNode} x {pool.deviceMemoryGiB:g} GiB"
    )


def distribute(total: int, shares: Sequence[float], caps: list[int], least: int = 1) -> list[int]:
    """Integers summing to `total`, proportional to `shares` (largest remainder), each in [least, cap]."""
    quota = [total * s / sum(shares) for s in shares]
    out = [min(c, max(least, floor(q))) for q, c in zip(quota, caps, strict=True)]
    while sum(out) < total:
        i = max((j for j in range(len(out)) if out[j] < caps[j]), key=lambda j: (quota[j] - out[j], -j))
        out[i] += 1
    while sum(out) > total:
        i = max((j for j in range(len(out)) if out[j] > least), key=lambda j: (out[j] - quota[j], -j))
        out[i] -= 1
    return out


# -- attention engine -------------------------------------------------------------------------
@dataclass
class _Engine:
    plan: EnginePlan
    max_devices: int  # attention devices at max_replicas


def _plan_engine(spec: api.V4DeploymentSpec, cfg: ModelConfig, warnings: list[str]) -> _Engine:
    pool = next(p for p in spec.pools if "attention" in p.roles)
    ctx = spec.model.maxContextTokens
    dense = sizing.dense_bytes(cfg)
    page, slot = sizing.page_bytes(cfg), sizing.slot_bytes(cfg)
    one_seq = sizing.pages_for(cfg, ctx) * page + slot
    usable = _usable(pool)
    sizes = [d for d in (1, 2, 4, 8, 16, 32, 64) if d <= pool.devicesPerNode]
    fits = [d for d in sizes if d * usable >= dense + one_seq] or [d for d in sizes if d * usable > dense + slot]
    if not fits:
        raise PlanError(
            [
                f"pool `{pool.name}`: one node of {pool.devicesPerNode} x {pool.deviceMemoryGiB:g} GiB "
                "cannot hold an attention "
                f"replica: dense weights {human_bytes(dense)} + one request's state {human_bytes(slot)} with a "
                f"{RESERVE_FRACTION:.0%} working reserve per device; need devices of at least "
                f"{human_bytes((dense + one_seq) / pool.devicesPerNode / (1 - RESERVE_FRACTION))}"
            ]
        )
    per_replica = fits[0]
    budget = int(per_replica * usable - dense)
    seqs = spec.serving.maxNumSeqs
    if seqs * slot > budget // 2:
        seqs = max(1, budget // 2 // slot)
        warnings.append(
            f"serving.maxNumSeqs lowered from {spec.serving.maxNumSeqs} to {seqs}: each request's state takes "
            f"{human_bytes(slot)} and states may use at most half of the {human_bytes(budget)} KV budget"
        )
    pages = (budget - seqs * slot) // page
    capacity = pages * sizing.page_tokens(cfg)
    if capacity < ctx:
        warnings.append(
            f"KV capacity per attention replica is {capacity:,} tokens, below model.maxContextTokens {ctx:,}: "
            f"pool `{pool.name}` leaves {human_bytes(budget)} per replica of {per_replica} device(s) after weights"
        )
    auto = spec.autoscaling
    replicas = spec.replicas if spec.replicas is not None else (auto.minReplicas if auto.enabled else 1)
    lo, hi = (auto.minReplicas, auto.maxReplicas) if auto.enabled else (replicas, replicas)
    per_node = pool.devicesPerNode // per_replica
    if ceil(hi / per_node) > pool.maxNodes:
        raise PlanError(
            [
                f"pool `{pool.name}`: {_shape(pool)} cannot hold {hi} attention replica(s) of {per_replica} device(s) "
                f"({per_node} per node), need at least {ceil(hi / per_node)} nodes"
            ]
        )
    engine = EnginePlan(
        pool=pool.name,
        devices_per_replica=per_replica,
        replicas=replicas,
        min_replicas=lo,
        max_replicas=hi,
        kv_budget_bytes=budget,
        capacity_tokens=capacity,
        page_tokens=sizing.page_tokens(cfg),
        max_num_seqs=seqs,
        max_batch_tokens=spec.serving.maxBatchTokens,
        max_queue=spec.serving.maxQueue,
        target_kv_utilization=auto.targetKVCacheUtilization,
        upscale_delay_s=float(auto.upscaleStabilizationSeconds),
        downscale_delay_s=float(auto.downscaleStabilizationSeconds),
        num_pages=pages,
        time_to_ready_s=float(auto.timeToReadySeconds),
        micro_batches=spec.serving.microBatches,
    )
    return _Engine(engine, hi * per_replica)


# -- expert shards ----------------------------------------------------------------------------
def _expert_load(expert_load: Any, n_layers: int, n_experts: int) -> np.ndarray:
    if expert_load is None:
        return np.ones((n_layers, n_experts))
    load = np.asarray(expert_load, dtype=np.float64)
    if load.shape != (n_layers, n_experts):
        raise PlanError(
            [f"expert_load: expected shape ({n_layers}, {n_experts}) (MoE layers x experts), got {load.shape}"]
        )
    if not np.isfinite(load).all() or (load < 0).any():
        raise PlanError(["expert_load: entries must be finite and non-negative"])
    load = load.copy()
    load[load.sum(axis=1) == 0] = 1.0  # a layer without statistics is treated as uniform
    return load


def _expert_devices(
    spec: api.V4DeploymentSpec, cfg: ModelConfig, engine: _Engine, n_slots: int
) -> list[tuple[api.PoolSpec, int, int]]:
    """[(pool, devices used, slots per device capacity)] over the expert pools."""
    column = cfg.num_hidden_layers * sizing.expert_bytes(cfg)
    pools = [p for p in spec.pools if "experts" in p.roles]
    problems: list[str] = []
    avail, cap = [], []
    for p in pools:
        taken = engine.max_devices if p.name == engine.plan.pool else 0
        avail.append(p.maxNodes * p.devicesPerNode - taken)
        cap.append(floor(_usable(p) / column))
        if cap[-1] == 0:
            problems.append(
                f"pool `{p.name}`: one {p.deviceMemoryGiB:g} GiB device ({human_bytes(_usable(p))} after the "
                f"{RESERVE_FRACTION:.0%} working reserve) cannot hold one expert slot ({cfg.num_hidden_layers} MoE "
                f"layers x {human_bytes(sizing.expert_bytes(cfg))} = {human_bytes(column)})"
            )
        elif avail[-1] <= 0:
            problems.append(
                f"pool `{p.name}`: attention replicas take all {p.maxNodes * p.devicesPerNode} devices, "
                "none left for experts"
            )
    if problems:
        raise PlanError(problems)
    offer = [a * c for a, c in zip(avail, cap, strict=True)]
    need = (
        f"{n_slots} expert slots per layer ({n_slots} x {cfg.num_hidden_layers} layers x "
        f"{human_bytes(sizing.expert_bytes(cfg))} = {human_bytes(n_slots * column)})"
    )
    if sum(offer) < n_slots:
        msgs = []
        for p, a, c, o in zip(pools, avail, cap, offer, strict=True):
            taken = p.maxNodes * p.devicesPerNode - a
            devices = ceil((n_slots - (sum(offer) - o)) / c)
            msgs.append(
                f"pool `{p.name}`: {_shape(p)} cannot hold {need}: {a} device(s) "
                f"{'left after attention ' if taken else ''}x {c} slots = {o}; need at least {devices} expert devices "
                f"({ceil((devices + taken) / p.devicesPerNode)} nodes)"
            )
        raise PlanError(msgs)
    ep = spec.parallelism.expertParallelSize
    if ep is None:
        frac = n_slots / sum(offer)
        used = [min(a, ceil(a * frac)) for a in avail]
        if sum(used) > n_slots:  # only with very small slots: keep at least one slot per device
            used = distribute(n_slots, offer, used, least=0)
    else:
        if ep > sum(avail):
            raise PlanError(
                [f"parallelism.expertParallelSize: {ep} devices requested, the expert pools offer {sum(avail)}"]
            )
        if ep > n_slots:
            raise PlanError(
                [
                    f"parallelism.expertParallelSize: {ep} devices exceed the {n_slots} expert slots per layer; "
                    "raise parallelism.redundantExperts or lower expertParallelSize"
                ]
            )
        used = distribute(ep, offer, avail, least=0)
        if sum(u * c for u, c in zip(used, cap, strict=True)) < n_slots:
            raise PlanError(
                [
                    f"parallelism.expertParallelSize: {ep} devices hold only "
                    f"{sum(u * c for u, c in zip(used, cap, strict=True))} slots per layer, {need} needed"
                ]
            )
    return [(p, u, c) for p, u, c in zip(pools, used, cap, strict=True)]


def _plan_experts(
    spec: api.V4DeploymentSpec, cfg: ModelConfig, engine: _Engine, expert_load: Any, warnings: list[str]
) -> tuple[list[ShardPlan], dict[str, int], float]:
    n_layers, n_experts = cfg.num_hidden_layers, cfg.n_routed_experts
    n_slots = n_experts + spec.parallelism.redundantExperts
    load = _expert_load(expert_load, n_layers, n_experts)
    groups = _expert_devices(spec, cfg, engine, n_slots)
    devices = [(p, i, c) for p, used, c in groups for i in range(used)]
    for p, used, _ in groups:
        if used == 0:
            warnings.append(f"pool `{p.name}` has role experts but gets no expert device at this expertParallelSize")
    slots = distribute(n_slots, [c for _, _, c in devices], [c for _, _, c in devices])
    placement = eplb.place(load, slots)
    column = n_layers * sizing.expert_bytes(cfg)
    shards = [
        ShardPlan(
            name=shard_name(p.name, i),
            pool=p.name,
            device=i,
            slots=slot_map,
            weight_bytes=s * column,
            capacity=float(s),
        )
        for (p, i, _), s, slot_map in zip(devices, slots, placement.slot_map(slots), strict=True)
    ]
    return shards, {p.name: used for p, used, _ in groups}, eplb.max_over_mean(placement.device_load, slots)


# -- expert transport -------------------------------------------------------------------------
def _plan_transport(
    spec: api.V4DeploymentSpec, cfg: ModelConfig, engine: EnginePlan, shards: list[ShardPlan], warnings: list[str]
) -> TransportPlan:
    vendor = {p.name: p.vendor for p in spec.pools}
    slots = sum(s.capacity for s in shards)
    cross = sum(s.capacity for s in shards if vendor[s.pool] != vendor[engine.pool]) / slots if slots else 0.0
    per_layer = cfg.num_experts_per_tok * 3 * cfg.hidden_size
    per_token = per_layer * cfg.num_hidden_layers
    per_token_s = per_token * ((1 - cross) / (DEVICE_LINK_GB_S * 1e9) + cross / (HOST_LINK_GB_S * 1e9))
    cross_step_ms = engine.max_num_seqs * per_token * cross / (HOST_LINK_GB_S * 1e9) * 1e3
    if cross_step_ms > CROSS_VENDOR_STEP_SHARE * STEP_MS:
        warnings.append(
            f"cross-vendor expert split: {cross:.0%} of token-expert pairs go from the `{engine.pool}` engines "
            f"({vendor[engine.pool]}) through host memory to another vendor's shards, {cross_step_ms:.1f} ms of a "
            f"{STEP_MS:g} ms decode step at {engine.max_num_seqs} sequences (over {CROSS_VENDOR_STEP_SHARE:.0%}; "
            f"assumed {HOST_LINK_GB_S:g} GB/s host path); keep expert layers on the engine's vendor or lower "
            "serving.maxNumSeqs"
        )
    return TransportPlan(
        bytes_per_token_layer=per_layer,
        moe_layers=cfg.num_hidden_layers,
        cross_vendor_share=round(cross, 6),
        device_link_gb_s=DEVICE_LINK_GB_S,
        host_link_gb_s=HOST_LINK_GB_S,
        per_token_us=round(per_token_s * 1e6, 3),
        cross_vendor_step_ms=round(cross_step_ms, 3),
        step_ms=STEP_MS,
    )


# -- the plan ---------------------------------------------------------------------------------
def plan(
    spec: api.V4DeploymentSpec | dict[str, Any],
    cfg: ModelConfig | None = None,
    expert_load: Any = None,
    name: str = "v4d",
) -> Plan:
    """Plan a deployment; PlanError (or validate.SpecError for a bad spec) when it cannot be placed."""
    if isinstance(spec, dict):
        spec = parse_spec(spec)
    model_name, resolved = resolve_model(spec.model.model_dump())
    cfg = cfg or resolved
    warnings: list[str] = []
    engine = _plan_engine(spec, cfg, warnings)
    shards, expert_devices, balance = _plan_experts(spec, cfg, engine, expert_load, warnings)
    transport = _plan_transport(spec, cfg, engine.plan, shards, warnings)
    pools = []
    for p in spec.pools:
        devices = expert_devices.get(p.name, 0)
        if p.name == engine.plan.pool:
            devices += engine.plan.replicas * engine.plan.devices_per_replica
        pools.append(
            PoolPlan(
                name=p.name,
                vendor=p.vendor,
                resource_name=p.resourceName or api.DEFAULT_RESOURCE[p.vendor],
                ray_resource=RAY_RESOURCE[p.vendor],
                devices_per_node=p.devicesPerNode,
                device_memory_gib=p.deviceMemoryGiB,
                nodes=ceil(devices / p.devicesPerNode),
                devices=devices,
                roles=list(p.roles),
                node_selector=dict(p.nodeSelector),
                tolerations=[t.model_dump(exclude_none=True) for t in p.tolerations],
                image=p.image,
            )
        )
    n_slots = cfg.n_routed_experts + spec.parallelism.redundantExperts
    secret = spec.serving.apiKeySecretRef
    return Plan(
        name=name,
        served_name=spec.model.servedName or (model_name if model_name != "custom" else name),
        model=model_name,
        config=cfg.to_dict(),
        weights_uri=spec.model.weights.uri,
        max_context_tokens=spec.model.maxContextTokens,
        precision=spec.model.precision,
        pools=pools,
        engine=engine.plan,
        shards=shards,
        experts=ExpertCounts(logical=cfg.n_routed_experts, physical=n_slots, redundant=n_slots - cfg.n_routed_experts),
        balance=Balance(max_over_mean=round(balance, 6)),
        kv=KVPlan(
            bytes_per_token=sizing.kv_bytes_per_token(cfg),
            capacity_tokens_per_replica=engine.plan.capacity_tokens,
        ),
        serving=ServingPlan(
            port=spec.serving.port,
            api_key_secret=secret.model_dump() if secret else None,
            max_queue=spec.serving.maxQueue,
            request_timeout_s=float(spec.serving.requestTimeoutSeconds),
            max_request_bytes=spec.serving.maxRequestBytes,
        ),
        warnings=warnings,
        transport=transport,
    )


def summary(p: Plan) -> api.PlanSummary:
    """The plan as the status shows it (status.plan)."""
    return api.PlanSummary(
        model=p.model,
        devices={pool.name: pool.devices for pool in p.pools},
        expertSlots=p.experts.physical,
        redundantExperts=p.experts.redundant,
        expertShards=len(p.shards),
        tokenCapacityPerReplica=p.kv.capacity_tokens_per_replica,
        maxOverMean=p.balance.max_over_mean,
        transportPerTokenMicroseconds=p.transport.per_token_us,
        crossVendorShare=p.transport.cross_vendor_share,
        transportAssumption=transport_assumption(p.transport),
        warnings=list(p.warnings),
    )


def transport_assumption(t: TransportPlan) -> str:
    """The links and step the transport figures assume, in words (v4d plan, status.plan)."""
    return (
        f"{t.bytes_per_token_layer:,} B per token per MoE layer x {t.moe_layers} layers; device link "
        f"{t.device_link_gb_s:g} GB/s within a vendor, host path {t.host_link_gb_s:g} GB/s across vendors; "
        f"{t.step_ms:g} ms decode step"
    )
