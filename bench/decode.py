"""Decode bench: batched paged decode step time, memory-roofline share, ops per layer, KV capacity.

    python bench/decode.py [--quick] [--json] [--device cuda]   # table; JSON to bench/results/decode.json

One run, side by side (the model's own forward, KV in the deployed format, one sequence per slot):
1. Decode steps at batch 1 / 16 / 64 / 256 and 8K context per sequence: step time, bytes read per
   step (active weights: all dense ones, the routed experts the batch can touch; KV: every layer's
   window, CSA indexer keys of all closed blocks + top-k entries, HCA every closed entry) over the
   measured bandwidth = share of the roofline, ops per layer (opcount.py: on a GPU each op is at most
   one launch), and tokens/s extrapolated to V4-Flash / V4-Pro depth (step time per layer x their
   layer count; CPU small dims are not comparable with a GPU's).
2. One sequence's decode step at 4K / 64K / 256K context, in total and (CPU) less the time spent
   in the indexer's key scan and top-k, the part that grows with context by design.
3. One 4K-token prefill chunk.
4. KV capacity in tokens for the planner's per-replica budget (examples/flash-h200.yaml): the
   engine's allocation (`kv_layout`) against the planner's `kv.capacity_tokens_per_replica`.
Caches are filled with random entries in the deployed format instead of running long prefills:
decode work depends on the number of entries, not their values. CPU: small dims, one thread, the
torch reference ops, CPU seconds of this process. CUDA: four layers of V4-Flash's real dims with
random weights made on the device, bf16, the Triton kernels, decode steps replayed as CUDA graphs
(V4D_CUDA_GRAPHS=0: eager); CUDA-event timing. `--profile BATCH` (repeatable, CUDA) profiles one
eager step and one replay at that batch: kernels per step and per layer, GPU busy time, and the
kernels that take the time (decode-profile.txt beside the JSON).
`--json` prints the result object (keys: ops_per_layer_step, launches_per_layer_step (the ops that
launch work, counted; one torch op can launch more than one CUDA kernel), cuda_kernels_per_layer_step
(measured with --profile), est_cuda_launches_per_layer_step (CPU: the busiest layer's CUDA kernels
estimated by opcount.decode_step_launches for a bf16 copy of the model, batch 1 and 64),
est_cuda_launches_busiest_layer (its kernels by name), est_cuda_launches (per layer, outside the
layers, a graph replay's own, per step, per step over layers), step_s_by_context,
kv_capacity_tokens, batches, prefill_4k) as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from v4d.kernels import ops
from v4d.kernels.kv_format import pack_index, pack_main
from v4d.serving import sizing
from v4d.serving.config import FLASH, PRESETS, TINY, ModelConfig
from v4d.serving.model.cache import KVCache, SeqCache
from v4d.serving.model.graphs import DecodeGraphs
from v4d.serving.model.model import Transformer, init_weights
from v4d.serving.model.opcount import LAUNCH_BUDGET, decode_step_launches, ops_per_layer

OUT = Path(__file__).resolve().parent / "results" / "decode.json"
ROOT = Path(__file__).resolve().parents[1]

# Small dims, real structure: ratios 4 / 128, 128-token window, top-k 512 as V4-Flash; weights large
# enough next to the KV that, as in the real models, a decode step is mostly weight reads. Indexer
# work per compressed key (4 heads x 64 / 4 positions) is 1/16 of the attention's per key (8 x 128),
# V4-Flash's proportion (64 x 128 / 4 vs 64 x 512).
CPU_CFG = replace(
    TINY,
    hidden_size=512,
    num_attention_heads=8,
    head_dim=128,
    qk_rope_head_dim=32,
    q_lora_rank=256,
    o_groups=2,
    o_lora_rank=256,
    index_n_heads=4,
    index_head_dim=64,
    index_topk=512,
    n_routed_experts=16,
    num_experts_per_tok=2,
    moe_intermediate_size=512,
    vocab_size=4096,
    max_position_embeddings=1 << 20,
)
# Four layers of V4-Flash (SWA, SWA, CSA, HCA) at its real dims, for the GPU run.
GPU_CFG = replace(
    FLASH,
    num_hidden_layers=4,
    num_nextn_predict_layers=0,
    compress_ratios=(0, 0, 4, 128),
    num_hash_layers=min(FLASH.num_hash_layers, 4),
)


# -- model and cache --------------------------------------------------------------------------------
def random_model(cfg: ModelConfig, device: torch.device) -> Transformer:
    if device.type == "cpu":
        return init_weights(Transformer(cfg), 0).eval()
    # On the device, in bf16 (default dtype while building: fp32 first would not fit): the weights
    # never pass through host memory.
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Transformer(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.dim() >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
            else:
                p.normal_(0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.randint(0, cfg.n_routed_experts, b.shape, device=device).to(b.dtype))
    return model.to(torch.bfloat16)


def filled_cache(
    cfg: ModelConfig, batch: int, context: int, device: torch.device, spare: int = 8
) -> tuple[KVCache, list[SeqCache]]:
    """A deployed-format cache where `batch` sequences hold `context` tokens (random entries), plus
    the scratch slot and page CUDA-graph padding rows write to (the last of each)."""
    pages = sizing.pages_for(cfg, context + spare)
    kv = KVCache(cfg, batch * pages + 1, batch + 1, device=device, fmt="deployed")
    g = torch.Generator(device=device).manual_seed(0)
    pattern_main = pack_main(torch.randn(4096, cfg.head_dim, generator=g, device=device), cfg.qk_rope_head_dim)
    pattern_index = pack_index(torch.randn(4096, cfg.index_head_dim, generator=g, device=device))
    for lc in kv.layers.values():
        for t, pattern in ((lc.window, pattern_main), (lc.main, pattern_main), (lc.index, pattern_index)):
            if t is not None:
                flat = t.view(-1, t.shape[-1])
                for lo in range(0, flat.shape[0], pattern.shape[0]):
                    flat[lo : lo + pattern.shape[0]] = pattern[: flat.shape[0] - lo]
        for st in (lc.comp, lc.index_comp):
            if st is not None:
                st.tail.normal_(generator=g)
    seqs = [SeqCache(b, list(range(b * pages, (b + 1) * pages)), context) for b in range(batch)]
    return kv, seqs


def timer(device: torch.device):
    """Seconds of `fn()`: CPU seconds of this process, or CUDA-event time on a GPU."""

    def run(fn) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.process_time()
        fn()
        return time.process_time() - t0

    return run


def decode_steps(model: Transformer, kv: KVCache, seqs: list[SeqCache], steps: int, device: torch.device) -> float:
    """Median time of `steps` decode steps (after one warm-up); on CUDA replayed as CUDA graphs
    (serving/model/graphs.py) unless V4D_CUDA_GRAPHS=0."""
    ids = torch.randint(0, model.cfg.vocab_size, (len(seqs),))
    run = timer(device)
    graphs = DecodeGraphs(
        model, kv, len(seqs[0].page_ids), scratch_slot=kv.num_slots - 1, scratch_page=kv.num_pages - 1
    )

    def step() -> None:
        batch = [(ids[b : b + 1], s) for b, s in enumerate(seqs)]
        if not graphs.use_graphs or graphs(batch) is None:
            model(batch, kv)

    times = []
    with torch.inference_mode():
        for i in range(steps + 1):
            t = run(step)
            if i:
                times.append(t)
    return statistics.median(times)


# -- bytes read per step ----------------------------------------------------------------------------
def step_bytes(model: Transformer, batch: int, context: int) -> tuple[int, int]:
    """(weight bytes, KV bytes) one decode step reads: dense weights once, the routed experts the
    batch touches (expected distinct experts under uniform routing, E (1 - (1 - k/E)^batch) per
    layer: k at batch 1, about 200 of 256 at batch 64), the embedding rows used; KV per sequence as
    documented."""
    cfg = model.cfg
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    touched = 1 - (1 - k / e) ** batch
    weights = 0
    for name, p in model.named_parameters():
        if name.startswith("mtp."):
            continue
        if name == "embed.weight":
            weights += batch * p.shape[1] * p.element_size()
        else:
            weights += int(p.nbytes * (touched if ".ffn.experts." in name else 1))
    main, index = sizing.main_entry_bytes(cfg), sizing.indexer_entry_bytes(cfg)
    kv = 0
    for layer in range(cfg.num_hidden_layers):
        ratio = cfg.compress_ratios[layer]
        kv += min(context, cfg.sliding_window) * main
        closed = context // ratio if ratio else 0
        if ratio == 4:
            kv += closed * index + min(cfg.index_topk, closed) * main
        elif ratio:
            kv += closed * main
    return weights, kv * batch


def bandwidth(device: torch.device) -> float:
    """Streaming read bandwidth (bytes/s): a sum over a large tensor, best of 5."""
    a = torch.ones((2**30 if device.type == "cuda" else 2**27) // 4, device=device)
    a.sum()
    run = timer(device)
    return a.nbytes / min(run(a.sum) for _ in range(5))


# -- the measurements -------------------------------------------------------------------------------
def by_batch(
    model: Transformer, batches: list[int], context: int, steps: int, device: torch.device, bw: float
) -> list[dict]:
    cfg, rows = model.cfg, []
    for b in batches:
        kv, seqs = filled_cache(cfg, b, context, device, spare=steps + 2)
        secs = decode_steps(model, kv, seqs, steps, device)
        weights, kv_bytes = step_bytes(model, b, context)
        with torch.inference_mode():
            ids = torch.zeros(b, 1, dtype=torch.long)
            counts, launching = ops_per_layer(model, partial(model, [(ids[i], s) for i, s in enumerate(seqs)], kv))
        per_layer = secs / cfg.num_hidden_layers
        rows.append(
            {
                "batch": b,
                "context": context,
                "step_s": secs,
                "weight_bytes": weights,
                "kv_bytes": kv_bytes,
                "roofline_share": (weights + kv_bytes) / bw / secs,
                "ops_per_layer": counts,
                "ops_per_layer_max": max(counts.values()),
                "ops_per_step": sum(counts.values()),
                "launching_ops_per_layer": launching,
                "launching_ops_per_layer_max": max(launching.values()),
                "tokens_per_s": b / secs,
                "tokens_per_s_flash": b / (per_layer * PRESETS["deepseek-v4-flash"].num_hidden_layers),
                "tokens_per_s_pro": b / (per_layer * PRESETS["deepseek-v4-pro"].num_hidden_layers),
            }
        )
        del kv, seqs
    return rows


def by_context(
    model: Transformer, contexts: list[int], steps: int, device: torch.device
) -> tuple[dict[str, float], dict[str, float] | None]:
    """One sequence's decode step time by context, and (CPU) the same less the time spent in the
    indexer's key scan and top-k (`paged_indexer_scores`, `indexer_topk`), the one part of a step
    that grows with context by design."""
    total, rest = {}, {}
    scan = [0.0]
    saved = {name: getattr(ops, name) for name in ("paged_indexer_scores", "indexer_topk")}

    def timed(fn):
        def call(*args):
            t0 = time.process_time()
            out = fn(*args)
            scan[0] += time.process_time() - t0
            return out

        return call

    for n in contexts:
        kv, seqs = filled_cache(model.cfg, 1, n, device, spare=steps + 2)
        if device.type == "cpu":
            for name, fn in saved.items():
                setattr(ops, name, timed(fn))
        try:
            scan[0] = 0.0
            total[str(n)] = decode_steps(model, kv, seqs, steps, device)
            rest[str(n)] = total[str(n)] - scan[0] / (steps + 1)
        finally:
            for name, fn in saved.items():
                setattr(ops, name, fn)
        del kv, seqs
    return total, (rest if device.type == "cpu" else None)


def prefill_chunk(model: Transformer, tokens: int, device: torch.device) -> float:
    cfg = model.cfg
    pages = sizing.pages_for(cfg, tokens)
    ids = torch.randint(0, cfg.vocab_size, (tokens,))
    run = timer(device)

    def once() -> float:
        kv = KVCache(cfg, pages, 1, device=device, fmt="deployed")
        with torch.inference_mode():
            return run(lambda: model([(ids, SeqCache(0, list(range(pages))))], kv))

    once()  # warm-up (kernel compilation on a GPU)
    return once()


def kernel_profile(model: Transformer, batch: int, context: int, device: torch.device) -> tuple[dict, str]:
    """CUDA kernels of one eager decode step and one graph replay at `batch` (torch profiler): real
    launches per layer (kernels per step / layers) and the table of the kernels that take the time."""
    from torch.profiler import ProfilerActivity, profile

    kv, seqs = filled_cache(model.cfg, batch, context, device, spare=8)
    ids = torch.randint(0, model.cfg.vocab_size, (batch,))
    graphs = DecodeGraphs(
        model, kv, len(seqs[0].page_ids), scratch_slot=kv.num_slots - 1, scratch_page=kv.num_pages - 1
    )
    batch_rows = [(ids[b : b + 1], s) for b, s in enumerate(seqs)]
    result, tables = {}, []
    with torch.inference_mode():
        for mode in ("eager", "graph"):
            run = partial(model, batch_rows, kv) if mode == "eager" else partial(graphs, batch_rows)
            if mode == "graph" and not graphs.use_graphs:
                continue
            run()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                run()
                torch.cuda.synchronize()
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            busy = sum(e.device_time for e in kernels) / 1e6  # us -> s
            result[mode] = {
                "kernels_per_step": len(kernels),
                "kernels_per_layer": len(kernels) / model.cfg.num_hidden_layers,
                "gpu_busy_s": busy,
            }
            tables.append(
                f"== {mode} decode step, batch {batch}, {context} context: {len(kernels)} kernels, "
                f"GPU busy {busy * 1e3:.2f} ms ==\n"
                + prof.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=60)
            )
    return result, "\n".join(tables)


def estimated_launches(cfg: ModelConfig, batches: tuple[int, ...] = (1, 64)) -> dict[int, dict]:
    """CPU: the CUDA kernels of a decode step estimated for a bf16 model of `cfg` (the GPU run's dtype,
    so its fp32 upcasts count) by `opcount.decode_step_launches`, per batch."""
    model = random_model(cfg, torch.device("cpu")).to(torch.bfloat16)
    out = {}
    for b in batches:
        est = decode_step_launches(model, b)
        busiest = max(est.per_layer, key=est.per_layer.get)
        out[b] = {
            "per_layer": est.per_layer,
            "busiest_layer": busiest,
            "busiest": est.per_layer[busiest],
            "busiest_by_kernel": dict(est.by_kernel[busiest].most_common()),
            "outside_layers": est.outside,
            "graph_replay": est.graph_replay,
            "per_step": est.total,
            # what --profile's kernels_per_layer measures (kernels per step / layers): the calibration figure
            "per_step_over_layers": round(est.total / cfg.num_hidden_layers, 1),
        }
    return out


def capacity() -> dict[str, int] | None:
    """Engine vs planner capacity for the flash-h200 example (None where the operator side is not
    installed, e.g. on a bare GPU box)."""
    try:
        import yaml

        from v4d.operator.planner import plan
        from v4d.serving.engine.engine import EngineLimits, kv_layout
    except ImportError:
        return None
    p = plan(yaml.safe_load((ROOT / "examples" / "flash-h200.yaml").read_text())["spec"], name="bench")
    cfg = ModelConfig.from_dict(p.config)
    pages, _, _ = kv_layout(cfg, EngineLimits.from_plan(p.engine, p.max_context_tokens))
    return {
        "engine": pages * sizing.page_tokens(cfg),
        "planner": p.kv.capacity_tokens_per_replica,
        "budget_bytes": p.engine.kv_budget_bytes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer batches and steps (CPU smoke run)")
    ap.add_argument("--json", action="store_true", help="print the result object as the last line")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument(
        "--profile", type=int, action="append", default=[], metavar="BATCH", help="CUDA: profile a decode step at BATCH"
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":  # the launch estimate runs Triton's interpreter, on before triton is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1 if device.type == "cpu" else torch.get_num_threads())
    cfg = CPU_CFG if device.type == "cpu" else GPU_CFG
    t0 = time.perf_counter()
    model = random_model(cfg, device)
    bw = bandwidth(device)
    batches = [1, 16, 64] if args.quick else [1, 16, 64, 256]
    steps = 2 if args.quick else 5
    rows = by_batch(model, batches, 8192, steps, device, bw)
    ctx, ctx_rest = by_context(model, [4096, 65536, 262144], 5, device)  # cheap: one sequence
    prefill = prefill_chunk(model, 4096, device)
    cap = capacity()
    est = estimated_launches(cfg) if device.type == "cpu" else {}
    profiled, tables = {}, []
    for b in args.profile if device.type == "cuda" else []:
        profiled[str(b)], table = kernel_profile(model, b, 8192, device)
        tables.append(table)
        print(
            f"\nCUDA kernels per decode step at batch {b}: "
            + ", ".join(
                f"{m}: {r['kernels_per_step']} ({r['kernels_per_layer']:.0f} per layer, "
                f"GPU busy {r['gpu_busy_s'] * 1e3:.2f} ms)"
                for m, r in profiled[str(b)].items()
            )
        )
    if tables:
        (args.out.parent / "decode-profile.txt").write_text("\n".join(tables) + "\n")
    print(
        f"\nDecode steps at 8K context ({device.type}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"KV deployed; bandwidth {bw / 1e9:.1f} GB/s)"
    )
    print(
        f"{'batch':>6} {'step ms':>9} {'roofline':>9} {'ops/layer':>10} {'launches':>9} {'est. CUDA':>10} "
        f"{'ops/step':>9} {'tok/s':>9} {'Flash tok/s':>12} {'Pro tok/s':>10}"
    )
    for r in rows:
        cuda = est[r["batch"]]["busiest"] if r["batch"] in est else "-"
        print(
            f"{r['batch']:>6} {r['step_s'] * 1e3:>9.2f} {r['roofline_share']:>9.1%} {r['ops_per_layer_max']:>10} "
            f"{r['launching_ops_per_layer_max']:>9} {cuda:>10} {r['ops_per_step']:>9} {r['tokens_per_s']:>9.1f} "
            f"{r['tokens_per_s_flash']:>12.1f} {r['tokens_per_s_pro']:>10.1f}"
        )
    print(
        "(ops/layer: the busiest layer's top-level torch ops, one per `ops` call; launches: less the ops "
        "that only make views and the no-op casts; est. CUDA: the busiest layer's CUDA kernels estimated "
        f"for a bf16 model (opcount.decode_step_launches; issue 11's target: {LAUNCH_BUDGET}))"
    )
    print("\nOne sequence's decode step by context (and less the indexer's key scan + top-k)")
    print(f"{'context':>8} {'step ms':>9} {'vs 4K':>7} {'w/o scan ms':>12} {'vs 4K':>7}")
    for n, s in ctx.items():
        r = ctx_rest[n] if ctx_rest else float("nan")
        r0 = ctx_rest["4096"] if ctx_rest else float("nan")
        print(f"{n:>8} {s * 1e3:>9.2f} {s / ctx['4096']:>7.2f} {r * 1e3:>12.2f} {r / r0:>7.2f}")
    print(f"\nOne 4K-token prefill chunk: {prefill:.3f} s ({4096 / prefill:,.0f} tokens/s)")
    if cap:
        print(
            f"KV capacity for {sizing.human_bytes(cap['budget_bytes'])} per replica (flash-h200): engine "
            f"{cap['engine']:,} tokens, planner {cap['planner']:,} ({cap['engine'] / cap['planner'] - 1:+.2%})"
        )
    by_b = {r["batch"]: r for r in rows}
    result = {
        "ops_per_layer_step": {str(b): by_b[b]["ops_per_layer_max"] for b in (1, 64)},
        "launches_per_layer_step": {str(b): by_b[b]["launching_ops_per_layer_max"] for b in (1, 64)},
        # estimated (CPU): CUDA kernels of the busiest layer per decode step, its kernels by name, and more
        "est_cuda_launches_per_layer_step": {str(b): e["busiest"] for b, e in est.items()} or None,
        "est_cuda_launches_busiest_layer": {
            str(b): {k: e[k] for k in ("busiest_layer", "busiest", "busiest_by_kernel")} for b, e in est.items()
        }
        or None,
        "est_cuda_launches": {
            str(b): {k: v for k, v in e.items() if not k.startswith("busiest")} for b, e in est.items()
        }
        or None,
        "step_s_by_context": ctx,
        "step_s_by_context_without_indexer_scan": ctx_rest,
        "kv_capacity_tokens": {k: cap[k] for k in ("engine", "planner")} if cap else None,
        "batches": rows,
        "prefill_4k": {"tokens": 4096, "seconds": prefill, "tokens_per_s": 4096 / prefill},
        "cuda_kernels": profiled or None,
        # measured: CUDA kernels of one replayed decode step / layers (embedding and head included)
        "cuda_kernels_per_layer_step": {b: round(r["graph"]["kernels_per_layer"], 1) for b, r in profiled.items()}
        if profiled and all("graph" in r for r in profiled.values())
        else None,
        "bandwidth_bytes_s": bw,
        "device": device.type,
        "quick": args.quick,
        "config": {
            "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size,
            "heads": cfg.num_attention_heads,
            "experts": cfg.n_routed_experts,
            "index_topk": cfg.index_topk,
        },
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        },
        "wall_s": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out} ({result['wall_s']:.0f} s)")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
