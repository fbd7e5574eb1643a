"""Precision of a serving process's weights and activations (torch-free: the API validates it too).

deployed  the checkpoint's own formats kept in memory: FP8 E4M3 block-scaled linear weights,
          packed MXFP4 routed experts, BF16 elsewhere, FP32 where the checkpoint has FP32;
          activations BF16. What `v4d plan` budgets with (`weight_bytes.deployed`).
bf16      every quantised weight decoded to BF16 once at load; activations BF16.
fp32      everything decoded to FP32: the exact reference the model tests compare against.
auto      deployed on an accelerator, fp32 on the CPU (no FP8 units there, and the CPU is where
          the exactness tests and small local runs happen).
"""

from __future__ import annotations

PRECISIONS = ("auto", "deployed", "bf16", "fp32")


def resolve_precision(precision: str, device_type: str) -> str:
    """`auto` -> deployed on an accelerator ("cuda", "npu"), fp32 on "cpu"; others as given."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "fp32" if device_type == "cpu" else "deployed"
    return precision
