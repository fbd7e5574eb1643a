"""Checkpoint tensors <-> logical values: stored form by format name (see layout), and back.

The number formats themselves (FP8 E4M3 with 128x128 UE8M0 block scales, MXFP4) are in
`v4d.kernels.quant` (the kernels' references decode them too).
"""

from __future__ import annotations

import torch

from v4d.kernels.quant import dequant_fp4, dequant_fp8, quant_fp4, quant_fp8


def pack(w: torch.Tensor, fmt: str, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A logical tensor in its stored form: (data, UE8M0 scales or None) for fmt
    "fp8" | "fp4" | "bf16" | "fp32" | "int32" (see v4d.serving.model.layout)."""
    if fmt == "fp8":
        return quant_fp8(w, block)
    if fmt == "fp4":
        return quant_fp4(w)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "int32": torch.int32}[fmt]
    return w.to(dtype).contiguous(), None


def unpack(data: torch.Tensor, scale: torch.Tensor | None, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """A stored tensor back to its logical values, float32 (int32 tables stay int32).

    The format is read off the stored dtype, so BF16/FP32 copies of quantised weights (a dequantised
    conversion of the official files) load too.
    """
    if data.dtype == torch.float8_e4m3fn:
        if scale is None:
            raise ValueError("an float8_e4m3fn weight needs its block scales")
        return dequant_fp8(data, scale, block)
    if data.dtype in (torch.int8, torch.uint8, torch.float4_e2m1fn_x2):
        if scale is None:
            raise ValueError("a packed FP4 weight needs its per-32 scales")
        return dequant_fp4(data, scale)
    if data.dtype in (torch.int32, torch.int64):
        return data.to(torch.int32)
    return data.float()
