"""FP8 block and MXFP4 formats: exact encodings, power-of-two scales, error bounds."""

import pytest
import torch

from v4d.kernels.quant import (
    FP4_VALUES,
    dequant_fp4,
    dequant_fp8,
    quant_fp4,
    quant_fp8,
    ue8m0_scale,
)
from v4d.serving.model.quant import pack, unpack


def test_ue8m0_is_the_smallest_sufficient_power_of_two():
    amax = torch.tensor([448.0, 449.0, 1.0, 0.0, 6.0 * 2**-10])
    s = ue8m0_scale(amax, 448.0)
    assert s.dtype == torch.float8_e8m0fnu
    assert s.float().tolist() == [1.0, 2.0, 2.0**-8, 1.0, 2.0**-16]


def test_fp8_partial_blocks_scales_and_error():
    torch.manual_seed(0)
    w = torch.randn(200, 300) * torch.logspace(-3, 2, 300)  # columns of very different magnitude
    q, s = quant_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (200, 300)
    assert s.dtype == torch.float8_e8m0fnu and s.shape == (2, 3)
    d = dequant_fp8(q, s)
    assert torch.isfinite(d).all()
    # Per block: E4M3 keeps 3 mantissa bits, so error <= 2^-4 of the value, plus subnormal steps.
    for bi in range(2):
        for bj in range(3):
            blk = (slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128))
            err = (d[blk] - w[blk]).abs()
            bound = w[blk].abs() * 2**-4 + s[bi, bj].float() * 2**-9
            assert (err <= bound).all()
            # the scale is as small as it can be without overflow: amax / s in (224, 448]
            ratio = w[blk].abs().max() / s[bi, bj].float()
            assert 224 < ratio <= 448


def test_fp8_representable_values_round_trip_exactly():
    base = torch.tensor([0.0, 1.0, -1.5, 448.0, 0.015625, -240.0]).repeat(3, 1)  # E4M3 values
    w = base * 2.0**-5
    q, s = quant_fp8(w, (128, 128))
    assert torch.equal(dequant_fp8(q, s), w)
    assert s.float().item() == 2.0**-5


def test_fp4_codes_and_nibble_order():
    # 0x9A: low nibble 0xA = -1.0 (even column), high 0x9 = -0.5; 0x71: 0.5 then 6.0 (all x4)
    packed = torch.tensor([[0x9A, 0x71] + [0] * 14], dtype=torch.uint8).view(torch.int8)
    scale = torch.tensor([[4.0]]).to(torch.float8_e8m0fnu)
    vals = dequant_fp4(packed, scale)
    assert vals.shape == (1, 32)
    assert vals[0, :4].tolist() == [-4.0, -2.0, 2.0, 24.0]
    codes = torch.arange(16, dtype=torch.uint8)
    table = dequant_fp4(
        (codes[0::2] | codes[1::2] << 4).view(torch.int8).repeat(1, 2), torch.ones(1, 1).to(torch.float8_e8m0fnu)
    )
    assert table[0, :16].tolist() == FP4_VALUES.tolist() + (-FP4_VALUES).tolist()


def test_fp4_round_trip_exact_grid_and_error_bound():
    torch.manual_seed(1)
    grid = FP4_VALUES[torch.randint(0, 8, (16, 64))] * torch.where(torch.rand(16, 64) < 0.5, -1.0, 1.0)
    grid[:, ::32] = 6.0  # every group reaches the max, so its scale is exactly 1 * 2^3
    w = grid * 8.0
    q, s = quant_fp4(w)
    assert q.dtype == torch.int8 and q.shape == (16, 32) and s.shape == (16, 2)
    assert torch.equal(dequant_fp4(q, s), w)
    r = torch.randn(8, 96) * 3
    q, s = quant_fp4(r)
    err = (dequant_fp4(q, s) - r).abs()
    # nearest E2M1: error at most half the widest gap (2 between 4 and 6), times the group scale
    assert (err <= s.float().repeat_interleave(32, 1)).all()
    assert torch.equal(dequant_fp4(q.view(torch.uint8).view(torch.float4_e2m1fn_x2), s), dequant_fp4(q, s))


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="multiple of 32"):
        quant_fp4(torch.randn(4, 48))
    q, s = quant_fp8(torch.randn(130, 10))
    with pytest.raises(ValueError, match="expected \\(2, 1\\)"):
        dequant_fp8(q, s[:1])
    with pytest.raises(ValueError, match="needs its block scales"):
        unpack(q, None)


@pytest.mark.parametrize(
    "fmt,dtype", [("fp8", torch.float8_e4m3fn), ("fp4", torch.int8), ("bf16", torch.bfloat16), ("fp32", torch.float32)]
)
def test_pack_unpack_by_format(fmt, dtype):
    w = torch.randn(64, 64)
    data, scale = pack(w, fmt)
    assert data.dtype == dtype and (scale is None) == (fmt in ("bf16", "fp32"))
    back = unpack(data, scale)
    assert back.dtype == torch.float32 and back.shape == w.shape
    assert torch.allclose(back, w, atol=2.0) and (fmt != "fp32" or torch.equal(back, w))
