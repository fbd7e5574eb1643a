"""DeepSeek-V4 number formats: FP8 block scaling and MXFP4, in pure torch.

They live in the kernel layer because the torch references of the quantised ops decode them too;
`v4d.serving.model.quant` maps checkpoint tensors onto them.

Both use UE8M0 scales (an 8-bit biased exponent, i.e. a power of two; torch `float8_e8m0fnu`):
- FP8: E4M3 values with one scale per 128x128 block of the [out, in] matrix (edge blocks partial).
- MXFP4: E2M1 values with one scale per 32 consecutive values along K (the input dim). Two values
  per byte, the even column in the low nibble; stored as int8 [out, in/2] like the official files.

Scales are the smallest power of two that maps the block's absolute maximum into range, so the
largest value never overflows; quantisation then rounds to the nearest representable value.
`dequant(quant(w))` is what a loaded checkpoint holds.

Activations entering an FP8 GEMM are quantised per token and per 128 channels with UE8M0 scales
(`act_quant`), as DeepSeek's inference code does (`scale_fmt: ue8m0`).
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP4_MAX = 6.0  # largest E2M1 magnitude
FP4_GROUP = 32
# E2M1 magnitudes by 3-bit code; bit 3 of a nibble is the sign.
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# Round-to-nearest boundaries between consecutive magnitudes (ties go to the smaller code).
_FP4_BOUNDS = (FP4_VALUES[1:] + FP4_VALUES[:-1]) / 2


def ue8m0_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Smallest power of two s with amax / s <= qmax, as float8_e8m0fnu (all-zero blocks get 1)."""
    ratio = amax.float() / qmax
    exp = torch.where(ratio > 0, torch.ceil(torch.log2(ratio.clamp(min=2.0**-126))), torch.zeros_like(ratio))
    return (exp.clamp(-127, 127) + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def _block_view(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
    """Zero-pad w to whole blocks; return it as [R, bo, C, bi] plus the original dims."""
    out, inp = w.shape
    bo, bi = block
    rows, cols = -(-out // bo), -(-inp // bi)
    padded = torch.zeros(rows * bo, cols * bi, dtype=torch.float32, device=w.device)
    padded[:out, :inp] = w.float()
    return padded.view(rows, bo, cols, bi), out, inp


def quant_fp8(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (float8_e4m3fn [out, in], float8_e8m0fnu [ceil(out/bo), ceil(in/bi)])."""
    if w.dim() != 2:
        raise ValueError(f"quant_fp8: expected a 2-D weight, got shape {tuple(w.shape)}")
    blocks, out, inp = _block_view(w, block)
    scale = ue8m0_scale(blocks.abs().amax(dim=(1, 3)), FP8_MAX)
    q = (blocks / scale.float()[:, None, :, None]).to(torch.float8_e4m3fn)
    return q.view(blocks.shape[0] * block[0], -1)[:out, :inp].contiguous(), scale


def dequant_fp8(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """Inverse of quant_fp8, in float32."""
    out, inp = q.shape
    expect = (-(-out // block[0]), -(-inp // block[1]))
    if tuple(scale.shape) != expect:
        raise ValueError(
            f"dequant_fp8: scale shape {tuple(scale.shape)} does not fit weight {(out, inp)} "
            f"with block {block}; expected {expect}"
        )
    s = scale.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:out, :inp]
    return q.float() * s


def quant_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [out, in/2] packed E2M1, float8_e8m0fnu [out, in/32])."""
    out, inp = w.shape
    if inp % FP4_GROUP:
        raise ValueError(f"quant_fp4: input dim {inp} must be a multiple of {FP4_GROUP}")
    groups = w.float().view(out, inp // FP4_GROUP, FP4_GROUP)
    scale = ue8m0_scale(groups.abs().amax(dim=2), FP4_MAX)
    x = (groups / scale.float()[..., None]).view(out, inp)
    # the count of boundaries below |x| (what bucketize computes, but much faster on CPU)
    mag = x.abs()
    code = torch.zeros_like(mag, dtype=torch.uint8)
    for bound in _FP4_BOUNDS.tolist():
        code += mag > bound
    code |= (x < 0).to(torch.uint8) << 3
    packed = code[:, 0::2] | (code[:, 1::2] << 4)
    return packed.view(torch.int8), scale


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of quant_fp4, in float32. Accepts int8/uint8 or float4_e2m1fn_x2 storage."""
    b = packed.view(torch.uint8)
    out, half = b.shape
    if tuple(scale.shape) != (out, 2 * half // FP4_GROUP):
        raise ValueError(
            f"dequant_fp4: scale shape {tuple(scale.shape)} does not fit packed weight "
            f"{(out, half)}; expected {(out, 2 * half // FP4_GROUP)}"
        )
    codes = torch.stack((b & 0x0F, b >> 4), dim=-1).view(out, 2 * half).long()
    # index_select, not fancy indexing: the latter is ~500x slower on CPU for a small table.
    mag = FP4_VALUES.to(b.device).index_select(0, (codes & 7).flatten()).view(codes.shape)
    vals = torch.where(codes >= 8, -mag, mag)
    return vals * scale.float().repeat_interleave(FP4_GROUP, 1)


def act_quant(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, K] -> (float8_e4m3fn [T, K], fp32 power-of-two scales [T, ceil(K/block)])."""
    t, k = x.shape
    nb = -(-k // block)
    padded = torch.zeros(t, nb * block, dtype=torch.float32, device=x.device)
    padded[:, :k] = x.float()
    groups = padded.view(t, nb, block)
    scale = ue8m0_scale(groups.abs().amax(dim=2), FP8_MAX).float()
    q = (groups / scale[..., None]).to(torch.float8_e4m3fn).view(t, nb * block)[:, :k]
    return q.contiguous(), scale
