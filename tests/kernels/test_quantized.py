"""Quantised ops: the FP8 block-scaled GEMM and the MXFP4 grouped MoE (Triton vs reference), and the
references against plain math on the decoded weights."""

import pytest
import torch

from v4d.kernels import reference as ref
from v4d.kernels.quant import act_quant, dequant_fp4, dequant_fp8, quant_fp4, quant_fp8


def fp8_weight(gen, n, k):
    return quant_fp8(torch.randn(n, k, generator=gen) / k**0.5)


@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (5, 200, 300), (70, 128, 256)], ids=["one", "ragged", "tiles"])
def test_fp8_linear_matches_reference(kops, gen, dtype, m, n, k):
    w, s = fp8_weight(gen, n, k)
    x = torch.randn(m, k, generator=gen).to(dtype)
    y = kops.fp8_linear(x, w, s)
    assert y.dtype == dtype and y.shape == (m, n)
    # Same FP8 operands and scales on both sides: only the summation order differs, and on Hopper
    # the FP8 tensor cores' own accumulation within each 128-wide K block (about 14 mantissa bits, the
    # reason DeepSeek promotes partial sums to fp32 every 128 elements, as this kernel does).
    tight = 1e-4 if kops.device.type == "cpu" else 2e-3  # the interpreter dots in exact fp32
    torch.testing.assert_close(
        y.float(),
        ref.fp8_linear(x, w, s).float(),
        atol=2e-2 if dtype != torch.float32 else tight,
        rtol=1e-2 if dtype != torch.float32 else tight,
    )


@pytest.mark.parametrize("m,n,k", [(3, 200, 300), (70, 128, 256)], ids=["decode", "prefill"])
def test_fp8_weight_only_matches_reference(kops, gen, dtype, m, n, k, tol):
    """act_quant=False: x is not rounded, the weight tile is decoded before a 16-bit dot."""
    w, s = fp8_weight(gen, n, k)
    x = torch.randn(m, k, generator=gen).to(dtype)
    want = ref.fp8_linear(x, w, s, False)
    torch.testing.assert_close(want.float(), (x.float() @ dequant_fp8(w, s).T).to(dtype).float())
    torch.testing.assert_close(kops.fp8_linear(x, w, s, False), want, **tol(dtype))


def test_act_quant_kernel_is_exact(gen, device):
    from v4d.kernels.fp8_gemm import quantise_activations as tri_act_quant

    x = torch.randn(7, 300, generator=gen) * torch.logspace(-3, 3, 300)
    x[2] = 0  # all-zero blocks get scale 1
    x[3, :128] = 448.0 * 4  # an exact power of two times the range: no rounding up
    q, s = (t.cpu() for t in tri_act_quant(x.to(device)))
    q_ref, s_ref = act_quant(x)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_fp8_linear_reference_is_the_dequantised_product(gen):
    w, s = fp8_weight(gen, 96, 384)
    x = torch.randn(9, 384, generator=gen)
    xq, xs = act_quant(x)
    exact = (xq.float() * xs.repeat_interleave(128, 1)) @ dequant_fp8(w, s).T
    torch.testing.assert_close(ref.fp8_linear(x, w, s), exact)
    # activation quantisation error stays at FP8's relative precision (2^-4) of the full product
    full = x @ dequant_fp8(w, s).T
    assert (ref.fp8_linear(x, w, s) - full).abs().max() < 0.1 * full.abs().max()


def fp4_experts(gen, e, inter, d):
    packed = []
    for shape in ((inter, d), (inter, d), (d, inter)):
        ws = [quant_fp4(torch.randn(*shape, generator=gen) / shape[1] ** 0.5) for _ in range(e)]
        packed.append((torch.stack([w for w, _ in ws]), torch.stack([s for _, s in ws])))
    (w1, s1), (w3, s3), (w2, s2) = packed
    return (w1, w3, w2), (s1, s3, s2)


@pytest.mark.parametrize(
    "t,d,inter,e,k,limit", [(13, 64, 96, 5, 3, 1.0), (4, 32, 64, 8, 6, 0.0)], ids=["ragged-clamped", "topk6"]
)
def test_fp4_moe_matches_reference(kops, gen, dtype, t, d, inter, e, k, limit, tol):
    (w1, w3, w2), scales = fp4_experts(gen, e, inter, d)
    x = torch.randn(t, d, generator=gen).to(dtype)
    ids = torch.randint(-1, e + 2, (t, k), generator=gen)
    ids[0] = -1
    weights = torch.rand(t, k, generator=gen)
    y = kops.moe_experts(x, ids, weights, w1, w3, w2, limit, scales)
    assert y.dtype == dtype and y.shape == (t, d)
    torch.testing.assert_close(y, ref.moe_experts(x, ids, weights, w1, w3, w2, limit, scales), **tol(dtype))
    assert (y[0] == 0).all()


@pytest.mark.parametrize("dense_macs", [0, ref.DENSE_MACS], ids=["loop", "dense"])
def test_fp4_moe_reference_equals_decoded_weights(gen, monkeypatch, dense_macs):
    monkeypatch.setattr(ref, "DENSE_MACS", dense_macs)
    (w1, w3, w2), scales = fp4_experts(gen, 3, 64, 32)
    dec = [torch.stack([dequant_fp4(w[i], s[i]) for i in range(3)]) for w, s in zip((w1, w3, w2), scales, strict=True)]
    x, ids, wt = torch.randn(6, 32, generator=gen), torch.randint(0, 3, (6, 2), generator=gen), torch.rand(6, 2)
    torch.testing.assert_close(
        ref.moe_experts(x, ids, wt, w1, w3, w2, 5.0, scales), ref.moe_experts(x, ids, wt, *dec, 5.0)
    )


def test_bad_quantised_input_names_the_argument(gen):
    from v4d.kernels import ops

    w, s = fp8_weight(gen, 64, 128)
    with pytest.raises(ValueError, match="fp8_linear: expected scale of shape"):
        ops.fp8_linear(torch.randn(2, 128), w, s[:, :0])
    with pytest.raises(ValueError, match="fp8_linear: expected w of dtype float8_e4m3fn"):
        ops.fp8_linear(torch.randn(2, 128), w.float(), s)
    (w1, w3, w2), (s1, s3, s2) = fp4_experts(gen, 2, 64, 32)
    ids, wt = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1)
    with pytest.raises(ValueError, match="moe_experts: expected s2 of shape"):
        ops.moe_experts(torch.randn(1, 32), ids, wt, w1, w3, w2, 0.0, (s1, s3, s1))
