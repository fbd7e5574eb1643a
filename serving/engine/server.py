"""The attention-engine Serve deployment: one replica = one attention/KV data-parallel rank.

Built from the plan (its `engine` section sizes the KV budget and batch limits) and the weights
directory. With expert shards, the replica loads only dense weights and reaches routed experts
through `RemoteExperts` over Serve handles; without, it holds every expert in-process. Shards are
either bound into the same app (`shards` = `bind_shards(...)`) or run as their own Serve apps, one
per shard named after it (`shard_apps=True`): then deleting the engine's app lets in-flight streams
finish (Serve drains the engine) while the shards they need keep serving.
It reports KV utilization and queue figures to the KV-pressure autoscaling policy.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import torch

from v4d.serving.autoscale import (
    KV_UTILIZATION,
    NUM_RUNNING,
    NUM_WAITING,
    KVPressurePolicy,
    autoscaling_config,
)
from v4d.serving.engine.engine import Engine, EngineLimits
from v4d.serving.engine.transport import ChannelTransport, RemoteExperts, ServeTransport, SlotMap
from v4d.serving.experts import pool_actor_options
from v4d.serving.metrics import ServingMetrics, plan_labels
from v4d.serving.model.loader import load_model
from v4d.serving.plan import Plan
from v4d.serving.runtime.channels import rendezvous, rendezvous_name
from v4d.serving.runtime.device import torch_device


class EngineServer:
    """Serve deployment body: `generate` (streaming), `stats`, `abort`, `record_autoscaling_stats`."""

    def __init__(self, plan: Plan, weights_dir: str, shards: dict[str, Any] | None = None, shard_apps: bool = False):
        torch.set_num_threads(1)
        if shard_apps:
            from ray import serve

            shards = {s.name: serve.get_deployment_handle(s.name, app_name=s.name) for s in plan.shards}
        eng = plan.engine
        # One device computes (index 0 of those Ray made visible); the replica claims all it was planned.
        model = load_model(
            weights_dir,
            with_experts=not shards,
            precision=plan.precision,
            device=torch_device(plan.pool(eng.pool).vendor),
            progress=False,
            mtp=False,
        )
        self.remote: RemoteExperts | None = None
        self.channels: ChannelTransport | None = None
        if shards:  # token rows go over direct channels; Serve handles only until a shard's is up
            self.channels = ChannelTransport(
                rendezvous(rendezvous_name(plan.name)),
                fallback=ServeTransport(shards),
                shards=list(shards),
                device=model.embed.weight.device.type,
            )
            self.remote = RemoteExperts(SlotMap.from_shards(plan.shards), self.channels)
            model.experts = self.remote
        self.metrics = ServingMetrics(role="engine", **plan_labels(plan, eng.pool))
        self.metrics.ready()
        self.metrics.kv_cache_usage_target.set(eng.target_kv_utilization)
        self.metrics.expert_redundant_copies.set(plan.experts.redundant)
        self.engine = Engine(model, EngineLimits.from_plan(eng, plan.max_context_tokens), self.metrics)

    def __del__(self) -> None:  # Serve's replica shutdown: close this engine's pairs
        channels = getattr(self, "channels", None)
        if channels is not None:
            channels.close()

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for item in self.engine.generate(request):
            yield item
        if self.remote is not None:
            self.metrics.expert_balance.set(self.remote.balance())

    async def stats(self) -> dict[str, Any]:
        return {**self.engine.stats(), **(self.channels.stats() if self.channels else {})}

    async def abort(self, request_id: str) -> bool:
        return self.engine.abort(request_id)

    def record_autoscaling_stats(self) -> dict[str, float]:
        s = self.engine.stats()
        return {KV_UTILIZATION: s["kv_cache_utilization"], NUM_WAITING: s["num_waiting"], NUM_RUNNING: s["num_running"]}


def bind_engine(
    plan: Plan,
    weights_dir: str,
    shards: dict[str, Any] | None = None,
    place: bool = True,
    name: str = "engine",
    shard_apps: bool = False,
) -> Any:
    """The engine deployment bound to the plan, autoscaled on KV pressure within the plan's bounds.

    `shards`: the shard applications of `bind_shards` to compose into this app; or `shard_apps=True`
    when each shard was deployed as its own app (named after the shard) before this one."""
    from ray import serve

    eng = plan.engine
    lo, hi = eng.min_replicas, eng.max_replicas
    options: dict[str, Any] = {
        "name": name,
        "autoscaling_config": autoscaling_config(
            KVPressurePolicy,
            lo,
            hi,
            min(max(eng.replicas, lo), hi),
            target_kv_utilization=eng.target_kv_utilization,
            target_waiting=max(1, eng.max_queue // 4),
            labels=plan_labels(plan, eng.pool),
            upscale_delay_s=eng.upscale_delay_s,
            downscale_delay_s=eng.downscale_delay_s,
            time_to_ready_s=eng.time_to_ready_s,
        ),
        # Above running + waiting, so requests beyond the engine's queue reach it and get Overloaded
        # (429) instead of waiting unbounded in Serve's router.
        "max_ongoing_requests": eng.max_num_seqs + eng.max_queue + 8,
        # On shutdown or downscale, in-flight streams may finish (up to the request timeout).
        "graceful_shutdown_wait_loop_s": 0.1,
        "graceful_shutdown_timeout_s": plan.serving.request_timeout_s,
    }
    if place:
        options["ray_actor_options"] = pool_actor_options(plan, eng.pool, eng.devices_per_replica)
    return serve.deployment(EngineServer).options(**options).bind(plan, weights_dir, shards or None, shard_apps)
