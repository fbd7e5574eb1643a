"""Byte layouts of the deployed KV cache (docs/deepseek-v4.md §2.4), packed and unpacked in torch.

Main entry (window ring and compressed pages), one uint8 row of `sizing.main_entry_bytes`:
  [nope FP8 E4M3 values][rope dims as BF16, 2 B each][one UE8M0 scale per 64 nope values][pad to 8]
  (V4: 448 + 128 + 7 + 1 = 584 B). A UE8M0 byte e means the scale 2**(e - 127); the scale of a
  group is the smallest power of two that keeps its largest magnitude within E4M3's 448.
Indexer key, one uint8 row of `sizing.indexer_entry_bytes`:
  [E2M1 (FP4) values, two per byte, element 2i in the low nibble][one UE8M0 scale per 32]
  (V4: 64 + 4 = 68 B), written after a normalised Walsh-Hadamard rotation of the key (the indexer
  queries get the same rotation, so scores are unchanged up to the FP4 rounding).
A store whose dtype is not uint8 holds plain rows (fp32 or bf16) of the entry's width.
The Triton kernels decode the same bytes inline (kernels/paged.py).
"""

from __future__ import annotations

from functools import lru_cache
from math import ceil

import torch

FP8_GROUP = 64  # nope values per UE8M0 scale of a main entry
FP4_GROUP = 32  # indexer values per UE8M0 scale
FP8_MAX, FP4_MAX = 448.0, 6.0
FP4_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # E2M1 magnitudes by 3-bit code


def main_bytes(d: int, rope_dim: int) -> int:
    nope = d - rope_dim
    return nope + 2 * rope_dim + ceil(ceil(nope / FP8_GROUP) / 8) * 8


def index_bytes(d: int) -> int:
    return d // 2 + ceil(d / FP4_GROUP)


def _ue8m0(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Exponent e (int) of the power-of-two scale 2**e with amax / 2**e <= qmax."""
    return torch.ceil(torch.log2(amax.clamp(min=2.0**-126) / qmax)).clamp(-127, 127)


def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    n = x.shape[-1]
    pad = -n % group
    return torch.nn.functional.pad(x, (0, pad)).unflatten(-1, (-1, group))


def pack_main(x: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """[R, d] float -> [R, main_bytes] uint8."""
    r, d = x.shape
    nope = d - rope_dim
    xf = x.float()
    g = _grouped(xf[:, :nope], FP8_GROUP)  # [R, G, 64]
    e = _ue8m0(g.abs().amax(-1), FP8_MAX)  # [R, G]
    q = (g / torch.exp2(e)[..., None]).flatten(1)[:, :nope].to(torch.float8_e4m3fn).view(torch.uint8)
    rope = xf[:, nope:].to(torch.bfloat16).view(torch.uint8)  # [R, 2 * rope]
    out = torch.zeros(r, main_bytes(d, rope_dim), dtype=torch.uint8, device=x.device)
    out[:, :nope] = q
    out[:, nope : nope + 2 * rope_dim] = rope
    out[:, nope + 2 * rope_dim : nope + 2 * rope_dim + e.shape[1]] = (e + 127).to(torch.uint8)
    return out


def unpack_main(rows: torch.Tensor, d: int, rope_dim: int) -> torch.Tensor:
    """[..., main_bytes] uint8 -> [..., d] fp32."""
    nope = d - rope_dim
    groups = ceil(nope / FP8_GROUP)
    vals = rows[..., :nope].contiguous().view(torch.float8_e4m3fn).float()
    rope = rows[..., nope : nope + 2 * rope_dim].contiguous().view(torch.bfloat16).float()
    e = rows[..., nope + 2 * rope_dim : nope + 2 * rope_dim + groups].float() - 127
    scale = torch.exp2(e).repeat_interleave(FP8_GROUP, dim=-1)[..., :nope]
    return torch.cat([vals * scale, rope], dim=-1)


@lru_cache(maxsize=8)
def hadamard_matrix(d: int, device: torch.device) -> torch.Tensor:
    """[d, d] fp32: the normalised Walsh-Hadamard matrix, made once per device (d a power of two)."""
    if d & (d - 1):
        raise ValueError(f"index_head_dim: the Hadamard rotation needs a power of two, got {d}")
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return (h / d**0.5).to(device)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Normalised Walsh-Hadamard rotation over the last dim (orthogonal and symmetric), fp32."""
    return x.float() @ hadamard_matrix(x.shape[-1], x.device)


@lru_cache(maxsize=8)
def _fp4_midpoints(device: torch.device) -> torch.Tensor:
    """Midpoints between E2M1 magnitudes, made once per device (no host copy while a CUDA graph
    is being captured)."""
    grid = torch.tensor(FP4_GRID)
    return ((grid[1:] + grid[:-1]) / 2).to(device)


def pack_index(x: torch.Tensor) -> torch.Tensor:
    """[R, d] float (already rotated) -> [R, index_bytes] uint8."""
    r, d = x.shape
    g = _grouped(x.float(), FP4_GROUP)  # [R, G, 32]
    e = _ue8m0(g.abs().amax(-1), FP4_MAX)
    y = (g / torch.exp2(e)[..., None]).flatten(1)[:, :d]
    code = torch.bucketize(y.abs(), _fp4_midpoints(x.device))  # nearest magnitude (ties down)
    nib = (code | ((y < 0).long() << 3)).to(torch.uint8)
    out = torch.empty(r, index_bytes(d), dtype=torch.uint8, device=x.device)
    out[:, : d // 2] = nib[:, 0::2] | (nib[:, 1::2] << 4)
    out[:, d // 2 :] = (e + 127).to(torch.uint8)
    return out


@lru_cache(maxsize=8)
def _fp4_pairs(device: torch.device) -> torch.Tensor:
    """[256, 2] fp32: the two E2M1 values (low nibble first) of every byte."""
    grid = torch.tensor(FP4_GRID)
    nib = torch.arange(16)
    vals = grid[nib & 7] * (1 - 2 * (nib >> 3)).float()
    b = torch.arange(256)
    return torch.stack([vals[b & 15], vals[b >> 4]], dim=-1).to(device)


@lru_cache(maxsize=8)
def _ue8m0_values(device: torch.device) -> torch.Tensor:
    return torch.exp2(torch.arange(256, dtype=torch.float32) - 127).to(device)


def unpack_index(rows: torch.Tensor, d: int) -> torch.Tensor:
    """[..., index_bytes] uint8 -> [..., d] fp32 (still in the rotated basis)."""
    vals = _fp4_pairs(rows.device)[rows[..., : d // 2].int()].flatten(-2)
    scale = _ue8m0_values(rows.device)[rows[..., d // 2 :].int()]
    return (vals.unflatten(-1, (-1, FP4_GROUP)) * scale[..., None]).flatten(-2)[..., :d]


def load_rows(rows: torch.Tensor, d: int, rope_dim: int | None) -> torch.Tensor:
    """Inverse of `ops.store_rows`, to fp32."""
    if rows.dtype != torch.uint8:
        return rows.float()
    return unpack_main(rows, d, rope_dim) if rope_dim is not None else unpack_index(rows, d)
