"""Kernel bench: every op of `v4d.kernels.ops`, Triton against the torch reference, side by side.

    python bench/kernels.py            # writes bench/results/kernels.json, prints a table

On a CUDA device: V4-Flash and V4-Pro shapes at decode (a batch of 64 sequences) and prefill (a
2048-token chunk); for each kernel the Triton time, the reference time, the speed-up, the achieved
memory bandwidth and TFLOP/s, the fraction of the device's peak for the bound that applies, and the
largest difference from the reference. Inputs are bf16 as deployed (compressor and mHC math in fp32).
Without CUDA it says so and only checks correctness, at small shapes, through the Triton interpreter.

The deployed-precision kernels (`fp8_linear_*`, FP8 weights with 128x128 scales and activations
quantised per 128; `moe_experts_fp4`, packed MXFP4 experts) count FP8 compute against twice the
bf16 peak (H200: 1,979 TFLOP/s dense) and have targets, reported under "targets" (not a pass/fail
of the check): decode at least 60% of the memory bandwidth for the bytes read, prefill FP8 GEMMs
at least 50% of the FP8 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

from v4d.kernels import kv_format, reference, triton_backend  # noqa: E402
from v4d.serving.config import PRESETS  # noqa: E402

# Dense peaks (bytes/s, bf16 FLOP/s) by device-name fragment, from the vendors' data sheets.
PEAKS = {
    "H200": (4.8e12, 989e12),
    "H100": (3.35e12, 989e12),
    "A100": (2.0e12, 312e12),
    "L40S": (0.864e12, 362e12),
    "B200": (8.0e12, 2250e12),
}


@dataclass
class Case:
    model: str
    phase: str
    kernel: str
    shape: str
    bytes: float  # minimum traffic: every input read once, every output written once
    flops: float
    run: Callable[[object], object]  # run(backend) -> output(s)
    fp8: bool = False  # FP8 tensor-core math: twice the bf16 compute peak


@dataclass
class Row:
    model: str
    phase: str
    kernel: str
    shape: str
    triton_ms: float | None
    reference_ms: float | None
    speedup: float | None
    tb_s: float | None
    tflop_s: float | None
    peak_frac: float | None
    bound: str | None
    max_err: float


def _nbytes(*ts: torch.Tensor) -> float:
    return float(sum(t.numel() * t.element_size() for t in ts))


def cases(name: str, phase: str, dev: torch.device, small: bool) -> list[Case]:
    """The op calls of one model at one phase. `small` shrinks everything for the interpreter."""
    cfg = PRESETS[name]
    gen = torch.Generator(device=dev).manual_seed(0)
    bf16 = torch.bfloat16 if CUDA else torch.float32  # the interpreter cannot do bf16 math
    decode = phase == "decode"
    t = (64 if decode else 2048) if not small else (4 if decode else 16)
    h, d = (cfg.num_attention_heads, cfg.head_dim) if not small else (16, 64)
    hi, di = (cfg.index_n_heads, cfg.index_head_dim) if not small else (16, 32)
    topk = cfg.index_topk if not small else 16
    win = cfg.sliding_window if not small else 8
    dm, inter = (cfg.hidden_size, cfg.moe_intermediate_size) if not small else (64, 32)
    n_hc, k_act = cfg.hc_mult, cfg.num_experts_per_tok
    e_local = 32 if not small else 8  # one expert shard's worth of experts
    s_comp = (32768 if decode else 8192) if not small else 48  # visible compressed entries
    n_pool = 262144 if not small else 256

    def rnd(*shape, dtype=bf16, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=dev) * scale).to(dtype)

    out: list[Case] = []
    # Inputs of the paged ops: window + top-k compressed entries per query (a CSA layer), and the
    # indexer's visible compressed keys.
    k_sel = win + topk
    q = rnd(t, h, d)
    idx = torch.randint(0, n_pool, (t, k_sel), generator=gen, device=dev, dtype=torch.int32)
    sink = rnd(h, dtype=torch.float32)
    qi, w = rnd(t, hi, di), rnd(t, hi, dtype=torch.float32)
    n_vis = torch.full((t,), s_comp, device=dev, dtype=torch.int32)
    # The paged ops the model calls, over a deployed-format cache (packed FP8 / FP4 rows in place).
    rd = cfg.qk_rope_head_dim if not small else 16
    ring = kv_format.pack_main(rnd(t * win, d, dtype=torch.float32), rd)
    store = kv_format.pack_main(rnd(n_pool, d, dtype=torch.float32), rd)
    fresh = kv_format.pack_main(rnd(t, d, dtype=torch.float32), rd)
    pidx = torch.cat(
        [t + torch.arange(t * win, device=dev, dtype=torch.int32).view(t, win), t + t * win + idx[:, win:]], dim=1
    )
    out.append(
        Case(
            name,
            phase,
            "paged_sparse_attention",
            f"T={t} H={h} D={d} K={k_sel} deployed",
            _nbytes(q, q, pidx) + t * k_sel * kv_format.main_bytes(d, rd),
            4.0 * t * h * k_sel * d,
            lambda b, a=(q, fresh, ring, store, pidx, sink, d**-0.5, rd): b.paged_sparse_attention(*a),
        )
    )
    nseq, per_seq = (t, -(-s_comp // 32)) if decode else (1, -(-s_comp // 32))
    pkeys = kv_format.pack_index(rnd(nseq * per_seq * 32, di, dtype=torch.float32)).unflatten(0, (-1, 32))
    table = torch.arange(nseq * per_seq, device=dev, dtype=torch.int32).view(nseq, per_seq)
    pseq = torch.arange(t, device=dev) if decode else torch.zeros(t, dtype=torch.long, device=dev)
    out.append(
        Case(
            name,
            phase,
            "paged_indexer_scores",
            f"T={t} Hi={hi} Di={di} S={s_comp} FP4",
            _nbytes(qi, w) + (t if decode else 1) * s_comp * kv_format.index_bytes(di) + t * s_comp * 4.0,
            2.0 * t * hi * s_comp * di,
            lambda b, a=(qi, w, pkeys, table, pseq, n_vis): b.paged_indexer_scores(*a),
        )
    )
    closing = t if decode else max(1, t // 4)
    ckv, csc = rnd(t, 2 * d, dtype=torch.float32), rnd(t, 2 * d, dtype=torch.float32)
    tkv, tsc = rnd(8 * t, 2 * d, dtype=torch.float32), rnd(8 * t, 2 * d, dtype=torch.float32)
    cidx = torch.randint(0, 9 * t, (closing, 8), generator=gen, device=dev)
    ape = rnd(4, 2 * d, dtype=torch.float32)
    out.append(
        Case(
            name,
            phase,
            "gated_pool_indexed",
            f"E={closing} L=8 C={d} CSA",
            _nbytes(cidx) + closing * 8 * 2 * d * 4.0 + closing * d * 4.0,
            4.0 * closing * 8 * d,
            lambda b, a=(ckv, csc, tkv, tsc, cidx, True, ape, ckv.dtype): b.gated_pool_indexed(*a),
        )
    )
    scores = rnd(t, s_comp, dtype=torch.float32)
    out.append(
        Case(
            name,
            phase,
            "indexer_topk",
            f"T={t} S={s_comp} k={topk}",
            _nbytes(scores) + t * topk * 4.0,
            0.0,
            lambda b, a=(scores, topk): b.indexer_topk(*a),
        )
    )
    # Routed experts of one shard: every token picks k of the shard's experts.
    x = rnd(t, dm)
    ids = torch.rand(t, e_local, generator=gen, device=dev).argsort(1)[:, :k_act]  # k distinct
    wts = torch.rand(t, k_act, generator=gen, device=dev)
    w1, w3 = rnd(e_local, inter, dm, scale=dm**-0.5), rnd(e_local, inter, dm, scale=dm**-0.5)
    w2 = rnd(e_local, dm, inter, scale=inter**-0.5)
    used = min(e_local, t * k_act)
    out.append(
        Case(
            name,
            phase,
            "moe_experts",
            f"T={t} k={k_act} E={e_local} d={dm} I={inter}",
            _nbytes(x, x, ids, wts) + _nbytes(w1) * 3 * used / e_local,
            6.0 * t * k_act * dm * inter,
            lambda b, a=(x, ids, wts, w1, w3, w2, cfg.swiglu_limit): b.moe_experts(*a),
        )
    )
    # The same experts packed MXFP4 as deployed (random valid bytes, scales 2^-6), decoded in registers.
    packed = [
        torch.randint(-128, 128, (e_local, o, i // 2), generator=gen, device=dev, dtype=torch.int8)
        for o, i in ((inter, dm), (inter, dm), (dm, inter))
    ]
    fp4_scales = tuple(
        torch.full((e_local, o, i // 32), 127 - 6, device=dev, dtype=torch.uint8).view(torch.float8_e8m0fnu)
        for o, i in ((inter, dm), (inter, dm), (dm, inter))
    )
    out.append(
        Case(
            name,
            phase,
            "moe_experts_fp4",
            f"T={t} k={k_act} E={e_local} d={dm} I={inter}",
            _nbytes(x, x, ids, wts) + _nbytes(*packed, *fp4_scales) * used / e_local,
            6.0 * t * k_act * dm * inter,
            lambda b, a=(x, ids, wts, *packed, cfg.swiglu_limit, fp4_scales): b.moe_experts(*a),
        )
    )
    # FP8 block-scaled projections as deployed: wq_b (q_lora -> heads x head_dim) and wo_b
    # (o_groups x o_lora -> d); random finite E4M3 bytes with scales 2^-12.
    for proj, (n_out, k_in) in (
        ("wq_b", (h * d, cfg.q_lora_rank if not small else 128)),
        ("wo_b", (dm, cfg.o_groups * cfg.o_lora_rank if not small else 256)),
    ):
        bits = torch.randint(0, 0x7F, (n_out, k_in), generator=gen, device=dev, dtype=torch.uint8)
        wq = (bits | (torch.randint(0, 2, (n_out, k_in), generator=gen, device=dev, dtype=torch.uint8) << 7)).view(
            torch.float8_e4m3fn
        )
        ws = torch.full((-(-n_out // 128), -(-k_in // 128)), 127 - 12, device=dev, dtype=torch.uint8)
        ws = ws.view(torch.float8_e8m0fnu)
        xin = rnd(t, k_in)
        out.append(
            Case(
                name,
                phase,
                f"fp8_linear_{proj}",
                f"M={t} N={n_out} K={k_in}",
                _nbytes(xin, wq, ws) + t * n_out * xin.element_size(),
                2.0 * t * n_out * k_in,
                lambda b, a=(xin, wq, ws): b.fp8_linear(*a),
                fp8=True,
            )
        )
        # the alternative measured side by side: weight-only dequantisation, bf16 dots
        out.append(
            Case(
                name,
                phase,
                f"fp8_w_only_{proj}",
                f"M={t} N={n_out} K={k_in}",
                _nbytes(xin, wq, ws) + t * n_out * xin.element_size(),
                2.0 * t * n_out * k_in,
                lambda b, a=(xin, wq, ws, False): b.fp8_linear(*a),
            )
        )
    # mHC: split + Sinkhorn of the mixes, then the stream reduction and expansion.
    mix = (2 + n_hc) * n_hc
    mixes, scale, base = rnd(t, mix, dtype=torch.float32), rnd(3, dtype=torch.float32), rnd(mix, dtype=torch.float32)
    it = cfg.hc_sinkhorn_iters
    out.append(
        Case(
            name,
            phase,
            "hc_split_sinkhorn",
            f"T={t} n={n_hc} iters={it}",
            _nbytes(mixes) + t * (2 * n_hc + n_hc * n_hc) * 4.0,
            t * it * 4.0 * n_hc * n_hc,
            lambda b, a=(mixes, scale, base, n_hc, it, cfg.hc_eps): b.hc_split_sinkhorn(*a),
        )
    )
    X, f = rnd(t, n_hc, dm), rnd(t, dm)
    pre, post = torch.rand(t, n_hc, device=dev), torch.rand(t, n_hc, device=dev)
    comb = torch.softmax(rnd(t, n_hc, n_hc, dtype=torch.float32), -1)
    out.append(
        Case(
            name,
            phase,
            "hc_pre",
            f"T={t} n={n_hc} d={dm}",
            _nbytes(X, f),
            2.0 * t * n_hc * dm,
            lambda b, a=(X, pre): b.hc_pre(*a),
        )
    )
    out.append(
        Case(
            name,
            phase,
            "hc_post",
            f"T={t} n={n_hc} d={dm}",
            _nbytes(X, X, f),
            2.0 * t * n_hc * dm * (n_hc + 1),
            lambda b, a=(f, X, post, comb): b.hc_post(*a),
        )
    )
    return out


def max_err(kernel: str, got, want) -> float:
    if kernel == "indexer_topk":  # a set per row: count rows whose sets differ
        return float(sum(sorted(a) != sorted(b) for a, b in zip(got.tolist(), want.tolist(), strict=True)))
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    err = 0.0
    for g, w in zip(got, want, strict=True):
        g, w = g.float(), w.float()
        fin = torch.isfinite(w)
        if not torch.equal(fin, torch.isfinite(g)):
            return float("inf")
        if fin.any():
            err = max(err, float((g[fin] - w[fin]).abs().max()) / max(1.0, float(w[fin].abs().max())))
    return err


def time_ms(fn: Callable[[], object], budget_s: float = 0.25) -> float:
    """Median of CUDA-event timings after a warm-up (compiles), within a small time budget."""
    fn()
    torch.cuda.synchronize()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < budget_s and len(times) < 200):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def bench(case: Case, peaks: tuple[float, float] | None) -> Row:
    got, want = case.run(triton_backend), case.run(reference)
    err = max_err(case.kernel, got, want)
    if not CUDA:
        return Row(case.model, case.phase, case.kernel, case.shape, None, None, None, None, None, None, None, err)
    del got, want
    tri = time_ms(lambda: case.run(triton_backend))
    ref = time_ms(lambda: case.run(reference))
    tb_s, tflop_s = case.bytes / tri / 1e9, case.flops / tri / 1e9
    frac = bound = None
    if peaks:
        mem, comp = tb_s * 1e12 / peaks[0], tflop_s * 1e12 / (peaks[1] * (2 if case.fp8 else 1))
        frac, bound = (mem, "memory") if mem >= comp else (comp, "compute")
    return Row(case.model, case.phase, case.kernel, case.shape, tri, ref, ref / tri, tb_s, tflop_s, frac, bound, err)


def _fracs(r: Row, peaks: tuple[float, float] | None) -> tuple[float | None, float | None]:
    """A deployed-precision row's fractions of the bandwidth and of the FP8 compute peak."""
    if peaks is None or r.tb_s is None:
        return None, None
    return r.tb_s * 1e12 / peaks[0], r.tflop_s * 1e12 / (2 * peaks[1])


def _fmt(v, spec: str) -> str:
    return format("-", f">{spec.split('.')[0]}") if v is None else format(v, spec)


def print_table(rows: list[Row]) -> None:
    head = (
        f"{'model':<18} {'phase':<8} {'kernel':<22} {'shape':<42} {'triton ms':>9} {'ref ms':>9} "
        f"{'x ref':>7} {'TB/s':>6} {'TFLOP/s':>8} {'% peak':>7} {'max err':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        pk = "-" if r.peak_frac is None else f"{100 * r.peak_frac:.0f}% {r.bound[:3]}"
        print(
            f"{r.model:<18} {r.phase:<8} {r.kernel:<22} {r.shape:<42} {_fmt(r.triton_ms, '9.3f')} "
            f"{_fmt(r.reference_ms, '9.3f')} {_fmt(r.speedup, '7.1f')} {_fmt(r.tb_s, '6.2f')} "
            f"{_fmt(r.tflop_s, '8.1f')} {pk:>7} {r.max_err:8.1e}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels.json"))
    # Without CUDA the shapes are small and the same for every model: one model is enough.
    default = ["deepseek-v4-flash", "deepseek-v4-pro"] if CUDA else ["deepseek-v4-flash"]
    ap.add_argument("--models", nargs="+", default=default, choices=sorted(PRESETS))
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if CUDA else "cpu")
    name = torch.cuda.get_device_name() if CUDA else platform.processor() or "cpu"
    peaks = next((p for k, p in PEAKS.items() if k in name), None) if CUDA else None
    if not CUDA:
        print("No CUDA device: correctness only, small shapes, Triton interpreter (no timings).")
    rows: list[Row] = []
    t0 = time.perf_counter()
    for model in args.models:
        for phase in ("decode", "prefill"):
            for case in cases(model, phase, dev, small=not CUDA):
                rows.append(bench(case, peaks))
            if CUDA:
                torch.cuda.empty_cache()
    print_table(rows)
    targets = [
        {
            "model": r.model,
            "phase": r.phase,
            "kernel": r.kernel,
            "bound": bound,
            "target": goal,
            "achieved": None if r.peak_frac is None else round(mem if bound == "memory" else comp, 3),
        }
        for r in rows
        if r.kernel.startswith(("fp8_linear", "moe_experts_fp4"))
        for bound, goal in [("memory", 0.6) if r.phase == "decode" else ("compute", 0.5)]
        if r.phase == "decode" or r.kernel.startswith("fp8_linear")
        for mem, comp in [_fracs(r, peaks)]
    ]
    for t in targets:
        if t["achieved"] is not None:
            print(
                f"target {t['model']} {t['phase']} {t['kernel']}: {100 * t['achieved']:.0f}% of {t['bound']} "
                f"peak (target {100 * t['target']:.0f}%): {'met' if t['achieved'] >= t['target'] else 'MISSED'}"
            )
    # Topk errors count rows; the rest are errors relative to max(1, |reference|).
    worst = max(r.max_err for r in rows)
    ok = worst < 5e-2
    result = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "device": name,
        "mode": "cuda" if CUDA else "cpu-interpreter-correctness-only",
        "peaks": None if peaks is None else {"bytes_per_s": peaks[0], "bf16_flop_per_s": peaks[1]},
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
        },
        "seconds": round(time.perf_counter() - t0, 1),
        "correct": ok,
        "rows": [asdict(r) for r in rows],
        "targets": targets,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\n{'all kernels match the reference' if ok else 'MISMATCH against the reference'} "
        f"(worst {worst:.1e}); {result['seconds']} s; wrote {args.out}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
