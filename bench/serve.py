"""Load-test `v4d serve` with the OpenAI SDK: throughput, TTFT, inter-token latency, batching gain,
and a KV-utilization / replica trace while the KV-pressure autoscaler works.

    .venv/bin/python bench/serve.py [--manifest examples/local-tiny.yaml] [--port 8170]

Starts `v4d serve` as a subprocess (the user's command), runs streaming chat requests at several
concurrencies side by side in one run, prints a table and writes bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
KV_LINE = re.compile(r"^ray_vllm_kv_cache_usage_perc\{([^}]*)\}\s+([0-9.eE+-]+)", re.M)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def one_request(client: openai.AsyncOpenAI, model: str, max_tokens: int, i: int) -> dict:
    t0 = time.perf_counter()
    times: list[float] = []
    stream = await client.chat.completions.create(
        model=model,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        messages=[{"role": "user", "content": f"Request {i}: tell me about the sea."}],
        extra_body={"thinking": {"type": "disabled"}, "ignore_eos": True},
        stream_options={"include_usage": True},
    )
    tokens = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {
        "ttft": times[0] - t0 if times else end - t0,
        "itl": [b - a for a, b in zip(times, times[1:], strict=False)],
        "tokens": tokens,
        "latency": end - t0,
    }


async def level(base: str, model: str, concurrency: int, max_tokens: int) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=5, timeout=600)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one_request(client, model, max_tokens, i) for i in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    itl = [x for r in results for x in r["itl"]]
    ttft = [r["ttft"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": concurrency,
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "output_tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_s": round(pct(ttft, 50), 4),
        "ttft_p99_s": round(pct(ttft, 99), 4),
        "itl_p50_s": round(pct(itl, 50), 4),
        "itl_p99_s": round(pct(itl, 99), 4),
    }


def trace_loop(metrics_urls: list[str], base: str, stop: threading.Event, out: list[dict], t0: float) -> None:
    while not stop.is_set():
        kv: dict[str, float] = {}
        for url in metrics_urls:
            try:
                text = httpx.get(url, timeout=5).text
            except httpx.HTTPError:
                continue
            for labels, value in KV_LINE.findall(text):
                replica = re.search(r'ReplicaId="([^"]*)"|replica="([^"]*)"|WorkerId="([^"]*)"', labels)
                kv[next(g for g in replica.groups() if g) if replica else labels] = float(value)
        decisions = httpx.get(f"{base}/v4d/autoscaling", timeout=5).json()["decisions"]
        engine = [d for d in decisions if d.get("deployment") == "engine"]
        out.append(
            {
                "t_s": round(time.time() - t0, 2),
                "kv_cache_utilization": kv,
                "target_replicas": engine[-1]["to"] if engine else None,
            }
        )
        stop.wait(1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", default=str(ROOT / "examples/local-tiny.yaml"))
    ap.add_argument("--port", type=int, default=8170)
    ap.add_argument(
        "--concurrency", default="1,4,16,32", help="levels; 32 overfills the queue target so the engines scale"
    )
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--cooldown-s", type=float, default=45.0, help="trace time after the load, for scale-down")
    args = ap.parse_args()
    base = f"http://127.0.0.1:{args.port}"
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "v4d"), "serve", args.manifest, "--port", str(args.port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    log: list[str] = []
    try:
        for line in proc.stdout:
            log.append(line)
            if "press Ctrl-C" in line:
                break
        else:
            sys.exit("v4d serve exited:\n" + "".join(log))
        out = "".join(log)
        model = re.search(r"ready: model (\S+)", out).group(1)
        metrics = re.findall(r"http://127\.0\.0\.1:\d+/metrics", out)
        t0 = time.time()
        trace: list[dict] = []
        stop = threading.Event()
        tracer = threading.Thread(target=trace_loop, args=(metrics, base, stop, trace, t0), daemon=True)
        tracer.start()
        asyncio.run(level(base, model, 1, 4))  # warm-up
        rows = [asyncio.run(level(base, model, int(c), args.max_tokens)) for c in args.concurrency.split(",")]
        time.sleep(args.cooldown_s)
        stop.set()
        tracer.join()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=180)
    by_c = {r["concurrency"]: r for r in rows}
    lo, hi = min(by_c), (16 if 16 in by_c else max(by_c))
    gain = by_c[hi]["output_tokens_per_s"] / by_c[lo]["output_tokens_per_s"]
    cols = [
        "concurrency",
        "output_tokens",
        "wall_s",
        "output_tokens_per_s",
        "ttft_p50_s",
        "ttft_p99_s",
        "itl_p50_s",
        "itl_p99_s",
    ]
    print(" | ".join(f"{c:>19}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:>19}" for c in cols))
    print(f"batching gain (tokens/s at {hi} concurrent over {lo}): {gain:.2f}x")
    replicas = [t["target_replicas"] for t in trace if t["target_replicas"] is not None]
    kv_max = max((max(t["kv_cache_utilization"].values(), default=0) for t in trace), default=0)
    print(
        f"autoscaling trace: {len(trace)} samples, max KV utilization {kv_max:.2f}, "
        f"target replicas seen {sorted(set(replicas))}"
    )
    result = {
        "manifest": args.manifest,
        "model": model,
        "max_tokens": args.max_tokens,
        "levels": rows,
        "batching_gain": round(gain, 3),
        "trace": trace,
        "note": "CPU-only run: the absolute numbers measure this machine, the ratios compare levels in one run",
    }
    dest = ROOT / "bench/results/serve.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
