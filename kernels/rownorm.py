"""`RowNorm`: the RMSNorm (and RoPE) a packing kernel applies to its rows before packing them, so a
norm and the store it feeds are one launch (`ops.store_rows(norm=)`)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class RowNorm(NamedTuple):
    """`ops.rms_norm(x, weight, eps, x.dtype, rotary)` of the rows: fp32 math, x's dtype out."""

    weight: torch.Tensor  # [C] gain
    eps: float
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # (pos [R], inv_freq): RoPE of the last channels
