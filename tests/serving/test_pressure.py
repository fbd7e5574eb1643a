"""KV pressure on a deliberately small budget: queueing, 429 + Retry-After, autoscaling up then down."""

import asyncio
import time

import httpx
import pytest
from helpers.servingapp import APP
from ray import serve

pytestmark = pytest.mark.ray

MODEL = "v4-tiny"
LONG = "The sea is wide and deep and full of fish. " * 30  # ~300 tokens: with the output 4 of the 8 KV pages


def _engine_replicas() -> int:
    return serve.status().applications[APP].deployments["engine"].replica_states.get("RUNNING", 0)


def test_kv_pressure_queues_rejects_and_autoscales(base_url, engine):
    body = {"model": MODEL, "prompt": LONG, "max_tokens": 150, "temperature": 0}
    stats_seen: list[dict] = []

    async def load():
        async with httpx.AsyncClient(timeout=300) as client:

            async def one():
                return await client.post(f"{base_url}/v1/completions", json=body)

            async def watch():
                while True:
                    stats_seen.append(await asyncio.to_thread(lambda: engine.stats.remote().result()))
                    await asyncio.sleep(0.5)

            watcher = asyncio.create_task(watch())
            results = await asyncio.gather(*(one() for _ in range(12)))
            watcher.cancel()
            return results

    results = asyncio.run(load())
    codes = [r.status_code for r in results]
    assert codes.count(200) >= 2 and 429 in codes, codes
    rejected = next(r for r in results if r.status_code == 429)
    assert int(rejected.headers["retry-after"]) >= 1
    assert rejected.json()["error"]["code"] == "overloaded"
    assert all(r.json()["usage"]["completion_tokens"] == 150 for r in results if r.status_code == 200)
    assert max(s["num_waiting"] for s in stats_seen) >= 1  # admitted requests queued for KV pages
    assert max(s["kv_cache_utilization"] for s in stats_seen) > 0.5

    # The KV-pressure policy scaled the engines up while loaded, and down once the load stopped.
    deadline = time.time() + 90
    decisions: list[dict] = []
    while time.time() < deadline:
        decisions = httpx.get(f"{base_url}/v4d/autoscaling").json()["decisions"]
        dirs = [d["direction"] for d in decisions if d["deployment"] == "engine"]
        if "up" in dirs and "down" in dirs[dirs.index("up") :]:
            break
        time.sleep(1)
    engine_decisions = [d for d in decisions if d["deployment"] == "engine"]
    up = next(d for d in engine_decisions if d["direction"] == "up")
    assert (up["from"], up["to"]) == (1, 2) and max(up["by_kv"], up["by_queue"]) >= 2, engine_decisions
    after = engine_decisions[engine_decisions.index(up) :]
    assert any(d["direction"] == "down" and d["to"] == 1 for d in after), engine_decisions
    deadline = time.time() + 60
    while _engine_replicas() != 1 and time.time() < deadline:
        time.sleep(1)
    assert _engine_replicas() == 1
