"""Model bench: KV bytes held vs the size math, hybrid vs dense prefill growth, decode vs roofline.

    python bench/model.py            # prints three tables, writes bench/results/model.json

All three comparisons are measured side by side in one run, on small random-weight configs (fp32,
CPU, the torch reference ops; one thread unless --threads; times are CPU seconds of this process):

1. KV state actually held per token at 4K / 32K / 128K context: a sequence gets the pages the
   engine would give it (`sizing.pages_for`) in a deployed-format `KVCache` (FP8 + BF16 rope, FP4 indexer)
   and is prefilled through the model
   in 2K chunks (up to --fill-up-to tokens; past that only allocated); held = its whole pages + its
   window rings, read from the tensors' sizes; analytic = `sizing.kv_bytes_at_context` (what `v4d model-info` prints).
   The compressor tails (fixed per request, not KV) are listed apart.
2. Prefill time of one CSA and one HCA attention layer (chunked as the engine runs it) against dense
   causal attention with the same projections and dims, at 4K / 16K / 64K
   tokens, with each one's growth exponent (slope of log time over log tokens). Dense runs the same
   torch ops in 1K query blocks against all earlier keys.
3. Decode tokens/s at batch 1 against the memory-bandwidth roofline: bytes of active weights plus
   KV read per token, over a bandwidth measured here with a large streaming read.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from v4d.serving import sizing
from v4d.serving.config import TINY, ModelConfig
from v4d.serving.model.cache import KVCache, SeqCache
from v4d.serving.model.model import Transformer, init_weights
from v4d.serving.model.step import Step

OUT = Path(__file__).resolve().parent / "results" / "model.json"

# Small dims, the real structure: real ratios (4 / 128), 128-token window, CSA/HCA alternating.
KV_CFG = replace(
    TINY,
    hidden_size=64,
    num_attention_heads=2,
    head_dim=64,
    q_lora_rank=32,
    o_lora_rank=32,
    o_groups=1,
    index_n_heads=2,
    index_head_dim=32,
    n_routed_experts=4,
    moe_intermediate_size=32,
    vocab_size=512,
    num_hash_layers=1,
)
# Dense cost per key (heads x head_dim = 128) vs indexer cost per compressed key (32 / 4 positions):
# 1/16, the same proportion as V4-Flash (64 x 512 vs 64 x 128 / 4).
ATTN_CFG = replace(KV_CFG, num_attention_heads=2, head_dim=64, index_n_heads=1, index_head_dim=32)
DECODE_CFG = replace(
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
    n_routed_experts=16,
    moe_intermediate_size=512,
    vocab_size=8192,
)


def timed(fn, repeat: int = 1) -> float:
    """CPU seconds of this process (best of `repeat`): with one torch thread this is the work done,
    undistorted by whatever else shares the machine."""
    best = math.inf
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def slope(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


# -- 1. KV bytes held -------------------------------------------------------------------------------
def kv_held(contexts: list[int], chunk: int, fill_up_to: int) -> list[dict]:
    cfg = KV_CFG
    model = init_weights(Transformer(cfg), 0).eval()
    ids = torch.randint(0, cfg.vocab_size, (max(contexts),), generator=torch.Generator().manual_seed(0))
    main = sizing.main_entry_bytes(cfg, "deployed")
    rows = []
    for n in contexts:
        pages = sizing.pages_for(cfg, n)
        kv = KVCache(cfg, pages, 1, fmt="deployed")
        seq = SeqCache(0, list(range(pages)))
        filled = n <= fill_up_to  # longer contexts: the allocation a sequence of n tokens is given

        def fill(n=n, kv=kv, seq=seq, filled=filled):
            for lo in range(0, n if filled else 0, chunk):
                model([(ids[lo : min(n, lo + chunk)], seq)], kv)

        secs = timed(fill)
        window = sum(lc.window[0].nbytes for lc in kv.layers.values())
        # bytes of entries the model actually wrote (non-zero rows of pages and rings)
        written = sum(
            int(t.flatten(0, -2).ne(0).any(-1).sum()) * t.shape[-1] * t.element_size()
            for lc in kv.layers.values()
            for t in (lc.window, lc.main, lc.index)
            if t is not None
        )
        held = len(seq.page_ids) * kv.page_nbytes + window
        tails = kv.slot_nbytes - window
        analytic = sizing.kv_bytes_at_context(cfg, n, "deployed")
        assert window == cfg.num_hidden_layers * cfg.sliding_window * main
        rows.append(
            {
                "context": n,
                "pages": pages,
                "held_bytes": held,
                "analytic_bytes": analytic,
                "written_bytes": written if filled else None,
                "held_per_token": held / n,
                "analytic_per_token": analytic / n,
                "held_over_analytic": held / analytic,
                "compressor_tail_bytes": tails,
                "filled": filled,
                "prefill_s": secs,
            }
        )
    return rows


# -- 2. hybrid vs dense prefill ---------------------------------------------------------------------
def dense_attention(attn, x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Causal attention over every previous token with the layer's own projections and dims, in
    query blocks (the same torch ops as the reference sparse path, without materialising T x T)."""
    T, H, D = x.shape[0], attn.n_heads, attn.head_dim
    pos = torch.arange(T)
    q = attn.rope(attn.wq_b(attn.q_norm(attn.wq_a(x))).view(T, H, D), pos)
    kv = attn.rope(attn.kv_norm(attn.wkv(x)), pos)
    o = torch.empty_like(q)
    for lo in range(0, T, block):
        hi = min(T, lo + block)
        z = torch.einsum("thd,sd->hts", q[lo:hi], kv[:hi]) * attn.scale
        z.masked_fill_(torch.arange(hi)[None, :] > torch.arange(lo, hi)[:, None], float("-inf"))
        o[lo:hi] = torch.einsum("hts,sd->thd", torch.softmax(z, dim=-1), kv[:hi])
    o = attn.rope(o, pos, inverse=True).reshape(T, attn.groups, -1)
    o = torch.einsum("tgc,grc->tgr", o, attn.wo_a.weight.view(attn.groups, attn.o_lora_rank, -1))
    return attn.wo_b(o.flatten(1))


def hybrid_prefill(model: Transformer, layer: int, x: torch.Tensor, chunk: int) -> None:
    cfg, T = model.cfg, x.shape[0]
    pages = sizing.pages_for(cfg, T)
    kv = KVCache(cfg, pages, 1)
    attn = model.layers[layer].attn
    for lo in range(0, T, chunk):
        hi = min(T, lo + chunk)
        attn(x[lo:hi], Step.build(cfg, [(lo, hi - lo, 0, list(range(pages)))], 1, "cpu"), kv.layer(layer))


def prefill_growth(lengths: list[int], chunk: int) -> dict:
    cfg = ATTN_CFG
    model = init_weights(Transformer(cfg), 0).eval()
    csa, hca = cfg.main_layer_kinds.index("csa"), cfg.main_layer_kinds.index("hca")
    x = torch.randn(max(lengths), cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    rows = []
    with torch.inference_mode():
        for n in lengths:
            rows.append(
                {
                    "tokens": n,
                    "csa_s": timed(lambda n=n: hybrid_prefill(model, csa, x[:n], chunk)),
                    "hca_s": timed(lambda n=n: hybrid_prefill(model, hca, x[:n], chunk)),
                    "dense_s": timed(lambda n=n: dense_attention(model.layers[csa].attn, x[:n])),
                }
            )
    ns = [r["tokens"] for r in rows]
    exps = {k: slope(ns, [r[f"{k}_s"] for r in rows]) for k in ("csa", "hca", "dense")}
    return {
        "rows": rows,
        "growth_exponent": exps,
        "dims": {
            "heads": cfg.num_attention_heads,
            "head_dim": cfg.head_dim,
            "index_heads": cfg.index_n_heads,
            "index_head_dim": cfg.index_head_dim,
            "index_topk": cfg.index_topk,
            "window": cfg.sliding_window,
            "chunk": chunk,
        },
    }


# -- 3. decode vs roofline --------------------------------------------------------------------------
def bandwidth() -> float:
    """Streaming read bandwidth (bytes/s) of this CPU: sum over a 512 MiB fp32 tensor, best of 5."""
    a = torch.ones(128 * 2**20)
    a.sum()
    return a.nbytes / timed(a.sum, repeat=5)


def active_weight_bytes(model: Transformer) -> int:
    """Weights one decode token reads: everything but the embedding table (one row) and the routed
    experts not chosen (k of E per layer), and the MTP block (not run)."""
    cfg = model.cfg
    total = cfg.hidden_size * 4
    for name, p in model.named_parameters():
        if name.startswith("mtp.") or name == "embed.weight":
            continue
        share = cfg.num_experts_per_tok / cfg.n_routed_experts if ".ffn.experts." in name else 1
        total += p.nbytes * share
    return int(total)


def kv_read_bytes(cfg: ModelConfig, context: int) -> int:
    """KV one decode token reads at `context`: each layer's window, plus for CSA the indexer keys of
    every closed block and the top-k entries, for HCA every closed entry (fp32 storage)."""
    main, index = sizing.main_entry_bytes(cfg, "fp32"), sizing.indexer_entry_bytes(cfg, "fp32")
    total = 0
    for layer in range(cfg.num_hidden_layers):
        ratio = cfg.compress_ratios[layer]
        total += min(context, cfg.sliding_window) * main
        closed = context // ratio if ratio else 0
        if ratio == 4:
            total += closed * index + min(cfg.index_topk, closed) * main
        elif ratio:
            total += closed * main
    return total


def decode_vs_roofline(context: int, steps: int) -> dict:
    cfg = DECODE_CFG
    model = init_weights(Transformer(cfg), 0).eval()
    ids = torch.randint(0, cfg.vocab_size, (context + steps,), generator=torch.Generator().manual_seed(0))
    pages = sizing.pages_for(cfg, context + steps)
    kv = KVCache(cfg, pages, 1)
    seq = SeqCache(0, list(range(pages)))
    for lo in range(0, context, 1024):
        model([(ids[lo : min(context, lo + 1024)], seq)], kv)
    model([(ids[context : context + 1], seq)], kv)  # warm-up step

    def run():
        for i in range(1, steps):
            model([(ids[context + i : context + i + 1], seq)], kv)

    secs = timed(run)
    bw = bandwidth()
    weights, kv_bytes = active_weight_bytes(model), kv_read_bytes(cfg, context)
    roofline = bw / (weights + kv_bytes)
    tps = (steps - 1) / secs
    return {
        "context": context,
        "tokens_per_s": tps,
        "bandwidth_bytes_s": bw,
        "active_weight_bytes": weights,
        "kv_read_bytes": kv_bytes,
        "roofline_tokens_per_s": roofline,
        "fraction_of_roofline": tps / roofline,
        "dims": {
            "hidden": cfg.hidden_size,
            "layers": cfg.num_hidden_layers,
            "experts": cfg.n_routed_experts,
            "experts_per_token": cfg.num_experts_per_tok,
            "vocab": cfg.vocab_size,
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smaller contexts, for a smoke run")
    ap.add_argument(
        "--fill-up-to",
        type=int,
        default=32768,
        help="prefill the KV-bytes sequences through the model up to this context (128K takes minutes)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    # 4000: not a whole number of pages, so the page padding shows
    contexts = [1000, 1024, 4096] if args.quick else [4000, 4096, 32768, 131072]
    lengths = [1024, 2048, 4096] if args.quick else [4096, 16384, 65536]
    t0 = time.perf_counter()
    kv = kv_held(contexts, chunk=2048, fill_up_to=args.fill_up_to)
    print("\nKV state held per token (deployed-format cache, small config) vs sizing.kv_bytes_at_context")
    print(
        f"{'context':>8} {'pages':>6} {'held B/tok':>11} {'analytic B/tok':>15} {'held/analytic':>14} "
        f"{'written/analytic':>17} {'tails B':>9} {'prefill s':>10}"
    )
    for r in kv:
        written = f"{r['written_bytes'] / r['analytic_bytes']:.4f}" if r["filled"] else "not run"
        print(
            f"{r['context']:>8} {r['pages']:>6} {r['held_per_token']:>11.2f} {r['analytic_per_token']:>15.2f} "
            f"{r['held_over_analytic']:>14.4f} {written:>17} {r['compressor_tail_bytes']:>9} "
            f"{r['prefill_s']:>10.1f}",
            flush=True,
        )
    pre = prefill_growth(lengths, chunk=4096)
    print("\nAttention prefill time, one layer (s): hybrid (chunked) vs dense causal, same dims")
    print(f"{'tokens':>8} {'CSA':>9} {'HCA':>9} {'dense':>9} {'dense/CSA':>10} {'dense/HCA':>10}")
    for r in pre["rows"]:
        print(
            f"{r['tokens']:>8} {r['csa_s']:>9.3f} {r['hca_s']:>9.3f} {r['dense_s']:>9.3f} "
            f"{r['dense_s'] / r['csa_s']:>10.2f} {r['dense_s'] / r['hca_s']:>10.2f}"
        )
    g = pre["growth_exponent"]
    print(f"{'exponent':>8} {g['csa']:>9.2f} {g['hca']:>9.2f} {g['dense']:>9.2f}", flush=True)
    dec = decode_vs_roofline(512 if args.quick else 4096, 16 if args.quick else 64)
    print(f"\nDecode at context {dec['context']} (batch 1, fp32)")
    print(f"{'tok/s':>8} {'roofline tok/s':>15} {'fraction':>9} {'GB/s':>7} {'weights MB':>11} {'KV MB':>7}")
    print(
        f"{dec['tokens_per_s']:>8.1f} {dec['roofline_tokens_per_s']:>15.1f} {dec['fraction_of_roofline']:>9.3f} "
        f"{dec['bandwidth_bytes_s'] / 1e9:>7.2f} {dec['active_weight_bytes'] / 1e6:>11.2f} "
        f"{dec['kv_read_bytes'] / 1e6:>7.2f}"
    )
    result = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
        "quick": args.quick,
        "kv_held": kv,
        "prefill": pre,
        "decode": dec,
        "wall_s": time.perf_counter() - t0,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {OUT} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
