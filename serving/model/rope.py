"""Interleaved rotary embedding on the last `qk_rope_head_dim` dims (docs/deepseek-v4.md §2.2).

Pairs are adjacent dims (2i, 2i+1), not the half-split layout. CSA/HCA layers use
`compress_rope_theta` with YaRN frequency blending (no attention-scale change); SWA-only layers use
`rope_theta` without YaRN. Angles are computed per call from fp32 positions exactly as the official
precomputed table would hold them, so no 1M-row table is kept.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from v4d.kernels import ops
from v4d.serving.config import ModelConfig


def inv_freq(
    dim: int, base: float, original_len: int = 0, factor: float = 1.0, beta_fast: int = 32, beta_slow: int = 1
) -> torch.Tensor:
    """Per-pair frequencies; with `original_len > 0`, YaRN blends interpolated and raw ones."""
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if original_len <= 0:
        return freqs

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    smooth = 1 - ramp
    return freqs / factor * (1 - smooth) + freqs * smooth


class Rope(nn.Module):
    """Rotates the last `dim` channels of a tensor by token position (or back, with `inverse`)."""

    def __init__(self, dim: int, freqs: torch.Tensor):
        super().__init__()
        self.dim = dim
        self.register_buffer("inv_freq", freqs, persistent=False)

    @classmethod
    def for_layer(cls, cfg: ModelConfig, layer: int) -> Rope:
        rd = cfg.qk_rope_head_dim
        if cfg.compress_ratios[layer]:
            rs = cfg.rope_scaling
            return cls(
                rd,
                inv_freq(
                    rd,
                    cfg.compress_rope_theta,
                    rs.original_max_position_embeddings,
                    rs.factor,
                    rs.beta_fast,
                    rs.beta_slow,
                ),
            )
        return cls(rd, inv_freq(rd, cfg.rope_theta))

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, inverse: bool = False, hadamard: bool = False
    ) -> torch.Tensor:
        """x: [T, ..., C] with C >= dim; pos: [T] absolute positions. Returns a new tensor (one
        `ops.rope` launch: angles computed in place, no table); `hadamard`: its Walsh-Hadamard
        rotation (fp32) in the same launch."""
        return ops.rope(x, pos, self.inv_freq, inverse, hadamard)
