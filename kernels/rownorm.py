"""`RowNorm`: the RMSNorm (and RoPE) a kernel applies to its input rows before its own work, so a norm
and the op it feeds are one launch: the packers (`ops.store_rows(norm=)`) and the attention's
queries (`ops.paged_sparse_attention(q_norm=)`)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class RowNorm(NamedTuple):
    """`ops.rms_norm(x, weight, eps, x.dtype, rotary)` of the rows: fp32 math, x's dtype out."""

    weight: torch.Tensor | None  # [C] gain, or none (the per-head query norm)
    eps: float
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # (pos [R], inv_freq): RoPE of the last channels
