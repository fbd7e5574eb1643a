"""Planner benchmark: planning time and expert balance (max/mean) on Zipf-skewed loads, side by side with an
independent straightforward EPLB implementation (tests/spine/eplb_reference.py) run on the same slots.

    .venv/bin/python bench/plan.py        # prints a table, writes bench/results/plan.json
"""

from __future__ import annotations

import importlib.util
import json
import platform
import time
from pathlib import Path

from v4d.operator.planner import plan
from v4d.serving.config import PRESETS

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("eplb_reference", ROOT / "tests" / "spine" / "eplb_reference.py")
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)

H200 = {"vendor": "nvidia", "devicesPerNode": 8, "deviceMemoryGiB": 141}
ASCEND = {"vendor": "ascend", "devicesPerNode": 8, "deviceMemoryGiB": 64}


def scenario(preset: str, pools: list[dict], ep: int, redundant: int, replicas: int) -> dict:
    return {
        "model": {"preset": preset, "maxContextTokens": 131072},
        "pools": pools,
        "parallelism": {"redundantExperts": redundant, "expertParallelSize": ep},
        "replicas": replicas,
    }


SCENARIOS = {
    "flash h200 ep8": scenario(
        "deepseek-v4-flash",
        [{"name": "h200", **H200, "maxNodes": 2, "roles": ["attention", "experts"]}],
        8,
        32,
        4,
    ),
    "flash h200+ascend ep24": scenario(
        "deepseek-v4-flash",
        [
            {"name": "h200", **H200, "maxNodes": 2, "roles": ["attention", "experts"]},
            {"name": "ascend", **ASCEND, "maxNodes": 2, "roles": ["experts"]},
        ],
        24,
        32,
        4,
    ),
    "pro h200 ep64": scenario(
        "deepseek-v4-pro",
        [{"name": "h200", **H200, "maxNodes": 9, "roles": ["attention", "experts"]}],
        64,
        64,
        8,
    ),
    "pro h200+ascend ep64": scenario(
        "deepseek-v4-pro",
        [
            {"name": "h200", **H200, "maxNodes": 4, "roles": ["attention", "experts"]},
            {"name": "ascend", **ASCEND, "maxNodes": 8, "roles": ["experts"]},
        ],
        64,
        64,
        4,
    ),
    "pro h200+ascend ep96": scenario(
        "deepseek-v4-pro",
        [
            {"name": "h200", **H200, "maxNodes": 4, "roles": ["attention"]},
            {"name": "h200x", **H200, "maxNodes": 4, "roles": ["experts"]},
            {"name": "ascend", **ASCEND, "maxNodes": 8, "roles": ["experts"]},
        ],
        96,
        96,
        8,
    ),
}
SKEWS = (0.0, 0.8, 1.2)


def run() -> list[dict]:
    rows = []
    for label, spec in SCENARIOS.items():
        cfg = PRESETS[spec["model"]["preset"]]
        for s in SKEWS:
            load = reference.zipf_loads(cfg.num_hidden_layers, cfg.n_routed_experts, s, seed=1)
            t0 = time.perf_counter()
            p = plan(spec, expert_load=load, name="bench")
            t_plan = time.perf_counter() - t0
            slots = [len(sh.slots[0]) for sh in p.shards]
            t0 = time.perf_counter()
            ref = reference.reference_max_over_mean(load, slots)
            t_ref = time.perf_counter() - t0
            rows.append(
                {
                    "scenario": label,
                    "model": p.model,
                    "zipf_s": s,
                    "layers": cfg.num_hidden_layers,
                    "experts": p.experts.logical,
                    "slots": p.experts.physical,
                    "devices": len(p.shards),
                    "plan_s": round(t_plan, 4),
                    "reference_s": round(t_ref, 4),
                    "max_over_mean": round(p.balance.max_over_mean, 4),
                    "reference_max_over_mean": round(ref, 4),
                    "balance_vs_reference": round(p.balance.max_over_mean / ref, 4),
                }
            )
    return rows


def main() -> None:
    rows = run()
    head = [
        "scenario",
        "zipf_s",
        "devices",
        "slots",
        "plan_s",
        "reference_s",
        "max_over_mean",
        "reference_max_over_mean",
        "balance_vs_reference",
    ]
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in head]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r[h]).ljust(w) for h, w in zip(head, widths, strict=True)))
    out = ROOT / "bench" / "results" / "plan.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
