"""Memory bench: bytes a loaded attention replica and expert shard hold, against what the plan budgets.

    python bench/memory.py            # table; writes bench/results/memory.json
    python bench/memory.py --json     # prints the JSON list of rows only

Models: v4-tiny (a `v4d checkpoint make` checkpoint; the shard is the first shard `v4d plan` makes of
examples/local-tiny.yaml) and `flash-2layer`, V4-Flash's real layer dimensions with two main layers
(one CSA, one HCA) and the MTP block, 16 routed experts per layer instead of 256 to keep the file
small (an expert's size does not depend on the count), written on the fly as random bytes in the
official format. Each is loaded as the serving processes load it, in the given precision (default
deployed): the replica with `load_model(with_experts=False, mtp=False)`, the shard with
`ShardExperts.from_checkpoint`. planned_bytes: the replica's dense part (`v4d model-info`
dense_bytes, what the planner fits per replica) and the shard's slots x layers x one expert
(`v4d plan` shard weight_bytes). resident_bytes: the distinct storages of the loaded tensors; on
CUDA also `torch.cuda.memory_allocated` after the load. peak_rss_growth_bytes: the process's peak
RSS during the load over its RSS before (host memory; a full fp32 copy on the host would show here).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from v4d.serving import sizing
from v4d.serving.config import ModelConfig, get_preset
from v4d.serving.experts import ShardExperts
from v4d.serving.model.layout import official_layout, scale_name
from v4d.serving.model.loader import CONFIG_FILE, INDEX_FILE, load_model

REPO = Path(__file__).resolve().parent.parent
TOLERANCE = 0.05


def flash_2layer() -> ModelConfig:
    return replace(
        get_preset("deepseek-v4-flash"),
        num_hidden_layers=2,
        num_hash_layers=1,
        compress_ratios=(4, 128, 0),
        n_routed_experts=16,
    )


def write_random(cfg: ModelConfig, out: Path, shard_size: int = 512 << 20) -> Path:
    """Random tensors in the official stored formats, one shard in memory at a time (FP8 and packed
    FP4 as random valid bytes with small power-of-two scales, so no large float tensor is made)."""
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight_map, shard, size, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            save_file(shard, out / f"model-{n:05d}.safetensors", metadata={"format": "pt"})
            weight_map.update({k: f"model-{n:05d}.safetensors" for k in shard})
        shard, size = {}, 0

    for name, t in official_layout(cfg).items():
        out_dim, in_dim = t.shape if len(t.shape) == 2 else (t.shape[0], 1)
        if t.storage == "fp8":  # |bits| < 0x7F: finite E4M3 (0x7F / 0xFF are NaN)
            bits = torch.randint(0, 0x7F, t.shape, generator=g, dtype=torch.uint8)
            bits |= torch.randint(0, 2, t.shape, generator=g, dtype=torch.uint8) << 7
            data = bits.view(torch.float8_e4m3fn)
            scale = torch.full((-(-out_dim // 128), -(-in_dim // 128)), 127 - 12, dtype=torch.uint8)
        elif t.storage == "fp4":  # any byte is two valid E2M1 codes
            data = torch.randint(-128, 128, (out_dim, in_dim // 2), generator=g, dtype=torch.int8)
            scale = torch.full((out_dim, in_dim // 32), 127 - 6, dtype=torch.uint8)
        elif t.storage == "int32":
            data = torch.randint(0, cfg.n_routed_experts, t.shape, generator=g, dtype=torch.int32)
            scale = None
        else:
            data = (torch.randn(t.shape, generator=g) * 0.02).to(
                torch.bfloat16 if t.storage == "bf16" else torch.float32
            )
            scale = None
        shard[name] = data
        if scale is not None:
            shard[scale_name(name)] = scale.view(torch.float8_e8m0fnu)
        size += t.nbytes()
        if size >= shard_size:
            flush()
    flush()
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.to_json(out / CONFIG_FILE)
    return out


def resident_bytes(tensors) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_mark() -> int:
    """Current RSS, after resetting the peak (Linux: clear_refs 5), so `peak_rss()` is this load's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS") * 1024
    except OSError:  # not Linux: the lifetime peak, an upper bound
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss() -> int:
    try:
        return _status_kib("VmHWM") * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(
    label: str, ckpt: Path, slots: list[list[int]], shard_planned: int, precision: str, device: torch.device
) -> list[dict]:
    cfg = ModelConfig.from_json(ckpt / CONFIG_FILE)
    rows = []
    for role in ("replica", "shard"):
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
        rss = rss_mark()
        if role == "replica":
            held = load_model(ckpt, with_experts=False, precision=precision, device=device, progress=False, mtp=False)
            resident = resident_bytes([*held.parameters(), *held.buffers()])
            planned = sizing.dense_bytes(cfg, "deployed")
        else:
            held = ShardExperts.from_checkpoint(cfg, slots, str(ckpt), precision, device)
            resident = resident_bytes(t for stacks in held.weights.values() for t in stacks)
            planned = shard_planned
        row = {
            "model": label,
            "role": role,
            "resident_bytes": resident,
            "planned_bytes": planned,
            "ratio": round(resident / planned, 4),
            "precision": precision,
            "device": str(device),
            "peak_rss_growth_bytes": peak_rss() - rss,
        }
        if device.type == "cuda":
            row["cuda_allocated_bytes"] = torch.cuda.memory_allocated() - base
        rows.append(row)
        del held
    return rows


def tiny_case(tmp: Path) -> tuple[Path, list[list[int]], int]:
    from v4d.operator.planner import plan
    from v4d.operator.validate import load_manifest
    from v4d.serving.checkpoint import make_checkpoint

    name, spec = load_manifest(REPO / "examples" / "local-tiny.yaml")
    shard = plan(spec, name=name).shards[0]
    return make_checkpoint("v4-tiny", tmp / "v4-tiny"), shard.slots, shard.weight_bytes


def flash_case(tmp: Path) -> tuple[Path, list[list[int]], int]:
    cfg = flash_2layer()
    slots = [list(range(8))] * cfg.num_hidden_layers  # half the experts of each layer on this shard
    return write_random(cfg, tmp / "flash-2layer"), slots, 8 * cfg.num_hidden_layers * sizing.expert_bytes(cfg)


CASES = {"v4-tiny": tiny_case, "flash-2layer": flash_case}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print only the JSON rows")
    ap.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--precision", default="deployed", choices=["deployed", "bf16", "fp32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "memory.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            ckpt, slots, shard_planned = CASES[model](Path(tmp))
            rows += measure(model, ckpt, slots, shard_planned, args.precision, torch.device(args.device))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"{'model':<14}{'role':<9}{'resident':>16}{'planned':>16}{'ratio':>8}{'peak RSS +':>16}")
        for r in rows:
            print(
                f"{r['model']:<14}{r['role']:<9}{r['resident_bytes']:>16,}{r['planned_bytes']:>16,}"
                f"{r['ratio']:>8.3f}{r['peak_rss_growth_bytes']:>16,}"
            )
    off = [r for r in rows if abs(r["ratio"] - 1) > TOLERANCE]
    for r in off:
        print(f"{r['model']} {r['role']}: resident {r['ratio']:.3f} x planned, beyond {TOLERANCE:.0%}", file=sys.stderr)
    return 1 if off else 0


if __name__ == "__main__":
    sys.exit(main())
