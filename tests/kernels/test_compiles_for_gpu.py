"""Every kernel variant the ops launch compiles for an NVIDIA sm_90 target (Triton + ptxas, no GPU).

Runs scripts/kernels-compile-check.py in a fresh process: this directory's process has the kernels
in interpreter mode, and the compiler needs them as ordinary `@triton.jit` functions.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_all_kernel_variants_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "V4D_KERNELS")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "kernels-compile-check.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    done = re.search(r"(\d+)/(\d+) kernel variants compile for sm_90", proc.stdout)
    assert done and done[1] == done[2], proc.stdout[-2000:]
    kernels = {
        "_indexer_topk_kernel",
        "_moe_route_kernel",
        "_moe_logits_kernel",
        "_copy_rows_kernel",
        "_tile_schedule_kernel",
        "_expert_up_kernel",
        "_expert_down_kernel",
        "_combine_kernel",
        "_split_sinkhorn_kernel",
        "_hc_pre_kernel",
        "_hc_pre_norm_kernel",
        "_hc_mixes_kernel",
        "_hc_mixes_part_kernel",
        "_hc_post_kernel",
        "_paged_attention_kernel",
        "_attention_merge_kernel",
        "_paged_indexer_scores_kernel",
        "_gated_pool_indexed_kernel",
        "_act_quant_kernel",
        "_fp8_gemm_kernel",
        "_rms_norm_kernel",
        "_rope_kernel",
        "_pack_main_kernel",
        "_pack_index_kernel",
    }
    compiled = set(re.findall(r"^ok +(\w+)", proc.stdout, re.M))
    assert compiled == kernels
    # fp32, fp16 and bf16 variants of the kernels that take activations, over plain and packed rows,
    # and split over packed rows
    assert len(re.findall(r"^ok +_paged_attention_kernel", proc.stdout, re.M)) == 9
