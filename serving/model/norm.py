"""RMSNorm with an fp32 gain, computed in fp32 whatever the activation dtype (as the official code)."""

from __future__ import annotations

import torch
from torch import nn

from v4d.kernels import ops


def rms_normalize(
    x: torch.Tensor,
    eps: float,
    dtype: torch.dtype = torch.float32,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """x / rms(x) over the last dim in fp32, no gain, stored as `dtype` (the per-head query norm and
    mHC use this); `rotary` = (pos, inv_freq) adds the RoPE; one `ops.rms_norm` launch."""
    return ops.rms_norm(x, None, eps, dtype, rotary)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`rotary` = (pos, inv_freq): the RoPE of the result in the same launch (ops.rms_norm)."""
        return ops.rms_norm(x, self.weight, self.eps, None, rotary)

    def as_row_norm(self, rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> ops.RowNorm:
        """This norm (and RoPE) for a packer to apply to the rows it stores (`ops.store_rows(norm=)`)."""
        return ops.RowNorm(self.weight, self.eps, rotary)
