"""A small, real Ray Serve app that records the whole serving catalogue the way v4d's parts do.

Ingress -> Engine (KV-pressure autoscaling policy in the Serve controller) -> expert shards, each
recording through `ServingMetrics` with its role, pool and vendor. Token timings are simulated (no
model); everything else - Serve, handles, HTTP, Ray's metrics pipeline, the policy in the
controller - is real. Used by test_prometheus_e2e.py while `v4d serve` is not available.
"""

from __future__ import annotations

import asyncio
import math
import time

from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy
from starlette.requests import Request
from starlette.responses import JSONResponse
from v4d.serving.metrics import KV_PAGE_KINDS, ServingMetrics

MODEL, DEPLOYMENT = "v4-tiny", "e2e"
ENGINE_POOL, EXPERT_POOL = ("gpu-a", "nvidia"), ("npu-b", "ascend")
TARGET_KV, MAX_REPLICAS, PAGES, LAYERS = 0.7, 2, 64, 3


class KVPressurePolicy:
    """Replicas = ceil(sum of per-replica KV usage / target), recorded as the autoscaler role."""

    def __init__(self, target: float, max_replicas: int):
        self.target, self.max_replicas = target, max_replicas
        self.m = ServingMetrics(model=MODEL, deployment=DEPLOYMENT, role="autoscaler", pool=ENGINE_POOL[0],
                                vendor=ENGINE_POOL[1], replica="")
        self.m.ready()
        self.m.autoscale_max_replicas.set(max_replicas)

    def __call__(self, ctx):
        usage = ctx.aggregated_metrics.get("kv_cache_usage", {})
        desired = max(1, math.ceil(sum(usage.values()) / self.target)) if usage else ctx.target_num_replicas
        target = min(desired, self.max_replicas)
        if target != ctx.target_num_replicas:
            self.m.autoscale_decisions.inc(tags={"direction": "up" if target > ctx.target_num_replicas else "down"})
        self.m.autoscale_desired_replicas.set(desired)
        self.m.autoscale_target_replicas.set(target)
        return target, ctx.policy_state


@serve.deployment(ray_actor_options={"num_cpus": 0})
class ExpertShard:
    def __init__(self, shard: str):
        self.shard = shard
        self.m = ServingMetrics(model=MODEL, deployment=DEPLOYMENT, role="experts", pool=EXPERT_POOL[0],
                                vendor=EXPERT_POOL[1])
        self.m.ready()

    def run(self, tokens: int) -> int:
        for layer in range(LAYERS):
            self.m.expert_tokens.inc(tokens * (layer + 1), {"shard": self.shard, "layer": layer})
        return tokens


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=8,
                  autoscaling_config=AutoscalingConfig(
                      min_replicas=1, max_replicas=MAX_REPLICAS, upscale_delay_s=0, downscale_delay_s=600,
                      metrics_interval_s=0.5, look_back_period_s=2,
                      policy=AutoscalingPolicy(policy_function=KVPressurePolicy,
                                               policy_kwargs={"target": TARGET_KV, "max_replicas": MAX_REPLICAS})))
class Engine:
    def __init__(self, shards: list):
        self.shards = shards
        self.m = ServingMetrics(model=MODEL, deployment=DEPLOYMENT, role="engine", pool=ENGINE_POOL[0],
                                vendor=ENGINE_POOL[1])
        self.m.ready()
        self.m.kv_cache_usage_target.set(TARGET_KV)
        self.m.expert_balance.set(1.25)
        self.m.expert_redundant_copies.set(2)
        self.pages_used, self.running, self.finished = 0, 0, 0

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"kv_cache_usage": self.pages_used / PAGES}

    def _gauges(self) -> None:
        self.m.kv_cache_usage.set(self.pages_used / PAGES)
        self.m.requests_running.set(self.running)
        self.m.requests_waiting.set(0)
        for kind in KV_PAGE_KINDS:
            self.m.kv_pages_in_use.set(self.pages_used, {"kind": kind})
        self.m.kv_state_slots_in_use.set(self.running)

    async def generate(self, prompt_tokens: int, max_tokens: int) -> dict:
        arrived = time.perf_counter()
        self.m.queue_time.observe(0.001)
        pages = 1 + prompt_tokens // 128
        self.pages_used += pages
        self.running += 1
        self._gauges()
        self.m.prompt_tokens.inc(prompt_tokens)
        await asyncio.gather(*(s.run.remote(prompt_tokens) for s in self.shards))
        self.m.ttft.observe(time.perf_counter() - arrived)
        for _ in range(max_tokens - 1):
            step = time.perf_counter()
            await asyncio.sleep(0.002)
            self.m.itl.observe(time.perf_counter() - step)
        self.m.generation_tokens.inc(max_tokens)
        self.finished += 1
        if self.finished % 5 == 0:
            self.m.preemptions.inc()
        self.m.e2e_latency.observe(time.perf_counter() - arrived)
        self.m.request_success.inc(tags={"finished_reason": "length"})
        self.pages_used -= pages
        self.running -= 1
        self._gauges()
        return {"tokens": max_tokens}


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Ingress:
    def __init__(self, engine):
        self.engine = engine
        self.m = ServingMetrics(model=MODEL, deployment=DEPLOYMENT, role="ingress", pool="", vendor="")
        self.m.ready()

    async def __call__(self, request: Request) -> JSONResponse:
        body = await request.json()
        if body.get("max_tokens", 0) < 1:
            self.m.request_errors.inc(tags={"kind": "bad_request"})
            return JSONResponse({"error": "max_tokens: expected an integer >= 1"}, status_code=400)
        if body.get("overload"):
            self.m.requests_rejected.inc(tags={"reason": "queue_full"})
            return JSONResponse({"error": "overloaded"}, status_code=429, headers={"Retry-After": "1"})
        return JSONResponse(await self.engine.generate.remote(body.get("prompt_tokens", 16), body["max_tokens"]))


def build():
    shards = [ExpertShard.options(name=f"experts-{EXPERT_POOL[0]}-{i}").bind(f"experts-{EXPERT_POOL[0]}-{i}")
              for i in range(2)]
    return Ingress.bind(Engine.bind(shards))
