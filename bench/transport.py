"""Expert transport benchmark: one MoE layer's dispatch + combine round trip (Serve handles vs direct
channels, by tokens), micro-batch overlap on/off, and local-tiny tokens/s through the server vs in process.

`round_trip_ms` is what the issue calls dispatch + combine: the engine splits a layer's rows by shard,
the rows go to every shard and the outputs come back and are added up, through the deployed path
(RemoteExperts over the pair channels, shards in other processes) with shards that return their input
instead of computing, so the figure is the transport's own cost, as DeepEP's dispatch + combine
timings leave out the expert GEMMs. `layer_call_ms` is the whole remote MoE layer with the shards'
math, beside the Serve-handle path (`serve_round_trip_ms`, also with math), and is broken down into
the expert compute (in-process shards, and each deployed shard's own math timed inside it), the
engine's split + combine (shards answering at once) and the pair's wire (one shard returning its
input); `layer_call_16_split_ms` splits the 16-token layer call into those and the rest. The pairs run
shared memory here (one host); dispatch + combine and the wire are also measured over gloo (as
between hosts: `round_trip_gloo_ms`, `wire_round_trip_gloo_ms`), and one round trip through a Ray
Compiled Graph beside them (`compiled_graph_round_trip_ms`), the alternative docs/engine.md weighs. Generation
in process uses the same split over in-process shards (`in_process_tokens_per_s`, the baseline the
server is compared with) and, beside it, all experts local.

    flock /tmp/v4d-servers.lock .venv/bin/python bench/transport.py [--quick] [--json]

Starts the `v4d serve` cluster of examples/local-tiny.yaml (head + one Ray node per pool, loopback
only) and deploys its app; prints a table and writes bench/results/transport.json (`--json` also
prints the JSON object). Every figure is measured side by side in this one run, on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENS = (1, 16, 64)


def layer_call(cfg, t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, cfg.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[: cfg.num_experts_per_tok] for _ in range(t)])
    return x, ids, torch.rand(t, cfg.num_experts_per_tok, generator=g)


def round_trip_ms(backend, cfg, t: int, reps: int) -> float:
    """Median ms of one layer's dispatch + combine of `t` tokens (MoE layers in turn)."""
    moe_layers = cfg.num_hidden_layers
    calls = [layer_call(cfg, t, i) for i in range(8)]
    for i in range(2 * moe_layers):  # every layer's first calls (shards set a layer up on first use) untimed
        backend(i % moe_layers, *calls[i % 8])
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        backend(i % moe_layers, *calls[i % 8])
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 3)


class ZeroTransport:
    """Shards that answer at once with zeros: what splitting rows and adding outputs costs alone."""

    def dispatch(self, layer, calls):
        return {s: torch.zeros(c[0].shape[0], c[0].shape[1]) for s, c in calls.items()}


def wire_ms(transport, shard: str, cfg, t: int, reps: int) -> float:
    """Median ms of one call of `t` rows to `shard` returning its input (one pair's wire alone)."""
    x, ids, w = layer_call(cfg, t, 0)
    for _ in range(3):
        transport.dispatch(0, {shard: (x, ids, w)})
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        transport.dispatch(0, {shard: (x, ids, w)})
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 3)


async def engine_tokens_per_s(engine, vocab: int, streams: int, max_tokens: int) -> float:
    """Decode tokens/s over `streams` concurrent requests (from each stream's first token on)."""

    async def one(i: int) -> tuple[int, float, float]:
        prompt = [(7 + 13 * i + 5 * j) % vocab for j in range(16)]
        first = last = None
        n = 0
        async for item in engine.generate({"prompt_token_ids": prompt, "max_tokens": max_tokens, "ignore_eos": True}):
            now = time.perf_counter()
            first = first or now
            last, n = now, n + len(item["token_ids"])
        return n - 1, first, last

    res = await asyncio.gather(*(one(i) for i in range(streams)))
    return sum(n for n, _, _ in res) / (max(e for _, _, e in res) - max(f for _, f, _ in res))


def server_tokens_per_s(base: str, model: str, streams: int, max_tokens: int) -> float:
    import openai

    async def one(client, i: int) -> tuple[int, float, float]:
        stream = await client.completions.create(
            model=model,
            prompt=f"Request {i}: the sea",
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        first = last = None
        n = 0  # tokens from the usage chunk: a chunk holds every token ready when it was sent
        async for chunk in stream:
            if chunk.usage:
                n = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].text:
                now = time.perf_counter()
                first = first or now
                last = now
        return n - 1, first, last

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=3, timeout=300)
        res = await asyncio.gather(*(one(client, i) for i in range(streams)))
        await client.close()
        return sum(n for n, _, _ in res) / (max(e for _, _, e in res) - max(f for _, f, _ in res))

    return asyncio.run(run())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", default=str(ROOT / "examples/local-tiny.yaml"))
    ap.add_argument("--port", type=int, default=8180, help="Serve HTTP port; Ray metrics on the next ones")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and tokens")
    ap.add_argument("--json", action="store_true", help="also print the result as one JSON object")
    args = ap.parse_args()
    reps, max_tokens = (30, 24) if args.quick else (200, 64)
    torch.set_num_threads(1)

    import ray
    from ray import serve

    from v4d.operator.planner import plan as make_plan
    from v4d.operator.validate import load_manifest
    from v4d.serving.config import ModelConfig
    from v4d.serving.engine.engine import Engine, EngineLimits
    from v4d.serving.engine.transport import (
        ChannelTransport,
        InProcessTransport,
        RemoteExperts,
        ServeTransport,
        SlotMap,
    )
    from v4d.serving.experts import ShardExperts
    from v4d.serving.local import APP_NAME, deploy, ensure_checkpoint, start_cluster
    from v4d.serving.model.loader import load_model
    from v4d.serving.runtime.channels import rendezvous, rendezvous_name
    from v4d.serving.runtime.runner import ModelRunner
    from v4d.serving.runtime.shm import SHM_PAIRS_ENV

    name, spec = load_manifest(args.manifest)
    plan = ensure_checkpoint(make_plan(spec, name=name))
    cfg, weights = ModelConfig.from_dict(plan.config), plan.weights_uri
    slot_map = SlotMap.from_shards(plan.shards)
    limits = EngineLimits.from_plan(plan.engine, plan.max_context_tokens)
    result: dict = {
        "manifest": os.path.relpath(args.manifest, ROOT),
        "shards": len(plan.shards),
        "moe_layers": cfg.num_hidden_layers,
        "quick": args.quick,
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "load_average_at_start": round(os.getloadavg()[0], 2),
    }

    # In process: the same split over in-process shards (no transport cost), and all experts local.
    cores = {s.name: ShardExperts.from_checkpoint(cfg, s.slots, weights) for s in plan.shards}
    in_process = RemoteExperts(slot_map, InProcessTransport(cores))
    result["compute_ms"] = {str(t): round_trip_ms(in_process, cfg, t, reps) for t in TOKENS}
    result["split_combine_ms"] = {
        str(t): round_trip_ms(RemoteExperts(slot_map, ZeroTransport()), cfg, t, reps) for t in TOKENS
    }
    split_model = load_model(weights, with_experts=False, progress=False)
    split_model.experts = in_process
    for key, model in (("in_process_tokens_per_s", split_model), ("in_process_local_tokens_per_s", None)):
        model = model or load_model(weights, progress=False)
        result[key] = {
            str(n): round(asyncio.run(engine_tokens_per_s(Engine(model, limits), cfg.vocab_size, n, max_tokens)), 2)
            for n in (1, 16)
        }

    local = start_cluster(plan, args.port + 1)
    try:
        deploy(plan, args.port)
        handles = {s.name: serve.get_deployment_handle(s.name, app_name=APP_NAME) for s in plan.shards}
        channels = ChannelTransport(rendezvous(rendezvous_name(plan.name)), shards=list(handles))
        if not channels.ready(list(handles), timeout_s=120):
            raise SystemExit("no channel to every shard within 120 s")
        new = RemoteExperts(slot_map, channels)
        # Dispatch + combine alone: the same slot map over channels to shards that return their input.
        echo_rdv = rendezvous_name(plan.name) + "-echo"
        echoes = [echo_actor().remote(echo_rdv, s.name) for s in plan.shards]
        ray.get([e.ready.remote() for e in echoes])
        # The pairs' default on one host (shared memory), then gloo as between hosts, side by side.
        result["channel_backends"] = channels.stats()["expert_channel_backends"]
        for suffix, shm in (("", "1"), ("_gloo", "0")):
            os.environ[SHM_PAIRS_ENV] = shm  # read when this process pairs
            wire = ChannelTransport(rendezvous(echo_rdv), shards=list(handles))
            if not wire.ready(list(handles), timeout_s=60):
                raise SystemExit("no channel to every echo shard within 60 s")
            result[f"wire_round_trip{suffix}_ms"] = {
                str(t): wire_ms(wire, plan.shards[0].name, cfg, t, reps * 3) for t in TOKENS
            }
            result[f"round_trip{suffix}_ms"] = {
                str(t): round_trip_ms(RemoteExperts(slot_map, wire), cfg, t, reps) for t in TOKENS
            }
            wire.close()
        del os.environ[SHM_PAIRS_ENV]
        for e in echoes:
            ray.kill(e)
        result["layer_call_ms"] = {str(t): round_trip_ms(new, cfg, t, reps) for t in TOKENS}
        # After the channels: a Serve handle's first call starts router threads in this process.
        old = RemoteExperts(slot_map, ServeTransport(handles))
        result["serve_round_trip_ms"] = {str(t): round_trip_ms(old, cfg, t, max(10, reps // 3)) for t in TOKENS}
        # Again, each shard timing its own math (its stats, read through the handles, in between).
        result["layer_call_ms_after_serve_handles"], result["shard_compute_ms"] = {}, {}
        for t in TOKENS:
            before = shard_compute(handles)
            result["layer_call_ms_after_serve_handles"][str(t)] = round_trip_ms(new, cfg, t, reps)
            after = shard_compute(handles)
            result["shard_compute_ms"][str(t)] = {
                s: round((after[s][1] - before[s][1]) / max(after[s][0] - before[s][0], 1) * 1e3, 3) for s in after
            }

        result["compiled_graph_round_trip_ms"] = compiled_graph_ms(cfg, reps * 3)

        # Micro-batch overlap: an engine in this process over the deployed shards' channels.
        remote_model = load_model(weights, with_experts=False, progress=False)
        remote_model.experts = new
        overlap = {}
        for mb in (1, 2):
            eng = Engine(remote_model, limits, runner=ModelRunner(remote_model, micro_batches=mb))
            overlap[str(mb)] = round(asyncio.run(engine_tokens_per_s(eng, cfg.vocab_size, 16, max_tokens)), 2)
        result["channels_16_streams_tokens_per_s_by_micro_batches"] = overlap
        eng = Engine(remote_model, limits)
        result["channels_in_process_tokens_per_s"] = {
            "1": round(asyncio.run(engine_tokens_per_s(eng, cfg.vocab_size, 1, max_tokens)), 2),
            "16": overlap["1"],
        }

        base = f"http://127.0.0.1:{args.port}"
        server_tokens_per_s(base, plan.served_name, 1, 4)  # warm-up
        result["server_tokens_per_s"] = {
            str(n): round(server_tokens_per_s(base, plan.served_name, n, max_tokens), 2) for n in (1, 16)
        }
        channels.close()
    finally:
        local.shutdown()
    # The 16-token layer call (the run with shard timings): the slowest shard's own math, the engine's
    # split + combine, the pair's wire (echo), and the rest (waiting for a core, thread wake-ups, unpacking).
    rt = result["layer_call_ms_after_serve_handles"]["16"]
    slowest = max(result["shard_compute_ms"]["16"].values())
    parts = {"shard_compute": slowest, "split_combine": result["split_combine_ms"]["16"]}
    parts["wire"] = result["wire_round_trip_ms"]["16"]
    result["layer_call_16_split_ms"] = {**parts, "rest": round(rt - sum(parts.values()), 3)}
    result["server_over_in_process"] = {
        n: round(result["in_process_tokens_per_s"][n] / result["server_tokens_per_s"][n], 2) for n in ("1", "16")
    }
    result["load_average_at_end"] = round(os.getloadavg()[0], 2)

    print(f"pairs: {result['channel_backends']}; dispatch+combine and wire also over gloo (as between hosts)")
    print(
        f"{'tokens':>8} | {'dispatch+combine ms':>19} | {'over gloo':>9} | {'layer call ms':>13} | "
        f"{'serve path ms':>13} | {'compute only ms':>15} | {'split+combine ms':>16} | {'wire ms':>8} | {'gloo':>6}"
    )
    for t in map(str, TOKENS):
        print(
            f"{t:>8} | {result['round_trip_ms'][t]:>19} | {result['round_trip_gloo_ms'][t]:>9} | "
            f"{result['layer_call_ms'][t]:>13} | {result['serve_round_trip_ms'][t]:>13} | "
            f"{result['compute_ms'][t]:>15} | {result['split_combine_ms'][t]:>16} | "
            f"{result['wire_round_trip_ms'][t]:>8} | {result['wire_round_trip_gloo_ms'][t]:>6}"
        )
    print(
        f"{'streams':>8} | {'in process, same split':>22} | {'in process, local experts':>25} | "
        f"{'engine here, shards over channels':>33} | {'server tok/s':>12} | {'same split / server':>19}"
    )
    for n in ("1", "16"):
        print(
            f"{n:>8} | {result['in_process_tokens_per_s'][n]:>22} | {result['in_process_local_tokens_per_s'][n]:>25} | "
            f"{result['channels_in_process_tokens_per_s'][n]:>33} | "
            f"{result['server_tokens_per_s'][n]:>12} | {result['server_over_in_process'][n]:>19}"
        )
    print(
        "one pair's wire, rows out and back (ms), shm / gloo / Ray Compiled Graph: "
        + ", ".join(
            f"{t} tokens {result['wire_round_trip_ms'][t]} / {result['wire_round_trip_gloo_ms'][t]} / "
            f"{result['compiled_graph_round_trip_ms'][t]}"
            for t in map(str, TOKENS)
        )
    )
    print("16-token layer call (ms):", ", ".join(f"{k} {v}" for k, v in result["layer_call_16_split_ms"].items()))
    o = result["channels_16_streams_tokens_per_s_by_micro_batches"]
    print(
        f"micro-batch overlap, 16 streams over channels: {o['1']} tok/s (1 batch) vs {o['2']} tok/s (2 micro-batches)"
    )
    dest = ROOT / "bench/results/transport.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {dest}")
    if args.json:
        print(json.dumps(result))


def compiled_graph_ms(cfg, reps: int) -> dict[str, float]:
    """Median ms of one round trip of `t` rows to an actor that returns them through a Ray Compiled
    Graph (the alternative to the pair channels, docs/engine.md): its shared-memory channels, no math."""
    import ray
    from ray.dag import InputNode

    @ray.remote(num_cpus=0)
    class Echo:
        def echo(self, x: torch.Tensor) -> torch.Tensor:
            return x

    actor = Echo.remote()
    with InputNode() as inp:
        dag = actor.echo.bind(inp).experimental_compile()
    out = {}
    try:
        for t in TOKENS:
            x = layer_call(cfg, t, 0)[0]
            for _ in range(3):
                ray.get(dag.execute(x))
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                ray.get(dag.execute(x))
                times.append(time.perf_counter() - t0)
            out[str(t)] = round(statistics.median(times) * 1e3, 3)
    finally:
        dag.teardown()
        ray.kill(actor)
    return out


def shard_compute(handles) -> dict[str, tuple[int, float]]:
    """(calls, seconds of expert math) each shard has served so far (ExpertShard.stats)."""
    stats = {s: h.stats.remote().result() for s, h in handles.items()}
    return {s: (st["calls"], st["compute_seconds"]) for s, st in stats.items()}


def echo_actor():
    """A Ray actor with a shard endpoint whose compute returns its input (no expert math)."""
    import ray

    @ray.remote(num_cpus=0)
    class Echo:
        def __init__(self, rdv: str, shard: str):
            from v4d.serving.runtime.channels import ShardEndpoint, rendezvous

            torch.set_num_threads(1)
            self.endpoint = ShardEndpoint(rendezvous(rdv), shard, lambda layer, x, ids, w: x)

        def ready(self) -> bool:
            return True

    return Echo


if __name__ == "__main__":
    main()
