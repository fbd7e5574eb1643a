"""Triton RMSNorm and RoPE (interpreter) against the references."""

import pytest
import torch

from v4d.kernels import reference as ref
from v4d.kernels.kv_format import hadamard
from v4d.serving.model.rope import inv_freq


@pytest.mark.parametrize("shape", [(5, 64), (3, 4, 40), (2, 3000), (0, 16)], ids=["row", "heads", "wide", "empty"])
@pytest.mark.parametrize("gain", [True, False])
def test_rms_norm(kops, dtype, gen, tol, shape, gain):
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    w = torch.rand(shape[-1], generator=gen) + 0.5 if gain else None
    for out in (dtype, torch.float32):
        got = kops.rms_norm(x, w, 1e-6, out)
        assert got.dtype == out and got.shape == x.shape
        torch.testing.assert_close(got, ref.rms_norm(x, w, 1e-6, out), **tol(out))


@pytest.mark.parametrize(
    "shape,dim", [((5, 4, 48), 16), ((3, 512), 64), ((2, 40), 40)], ids=["heads", "kv", "all-rope"]
)
@pytest.mark.parametrize("gain", [True, False])
def test_rms_norm_with_rope_is_the_two_ops(kops, dtype, gen, tol, shape, dim, gain):
    """One launch, the result of rms_norm then rope (rounded to the output dtype in between)."""
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    w = torch.rand(shape[-1], generator=gen) + 0.5 if gain else None
    pos = torch.tensor([3, 0, 100_000, 7, 4096][: shape[0]])
    f = inv_freq(dim, 10000.0, 4096, 16.0)
    got = kops.rms_norm(x, w, 1e-6, dtype, (pos, f))
    want = ref.rope(ref.rms_norm(x, w, 1e-6, dtype), pos, f, False)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, want, **tol(dtype))
    torch.testing.assert_close(ref.rms_norm(x, w, 1e-6, dtype, (pos, f)), want, atol=0, rtol=0)


@pytest.mark.parametrize(
    "shape,dim", [((6, 4, 48), 16), ((5, 32), 32), ((3, 2, 3, 24), 8)], ids=["heads", "all-rope", "4d"]
)
@pytest.mark.parametrize("inverse", [False, True])
def test_rope(kops, dtype, gen, tol, shape, dim, inverse):
    x = torch.randn(shape, generator=gen).to(dtype)
    pos = torch.tensor([0, 1, 7, 4096, 100_000, 3][: shape[0]])
    f = inv_freq(dim, 10000.0, 4096, 16.0)
    got = kops.rope(x, pos, f, inverse)
    assert got.dtype == dtype
    torch.testing.assert_close(got, ref.rope(x, pos, f, inverse), **tol(dtype))
    back = kops.rope(got.float(), pos, f, not inverse)  # rotating back restores x
    torch.testing.assert_close(back, x.float(), atol=2e-2 if dtype != torch.float32 else 1e-4, rtol=1e-2)


def test_column_slices_of_a_joined_projection_are_read_in_place(kops, dtype, gen):
    """Tokens at a row stride (a split of one GEMM's output), each token's heads contiguous: norm
    (with and without RoPE) and rope read them where they are, with the results of contiguous inputs."""
    joined = torch.randn(5, 3 * 48 + 40, generator=gen).to(dtype)
    x = joined[:, 40:].unflatten(-1, (3, 48))
    assert not x.is_contiguous()
    pos, f = torch.tensor([0, 1, 7, 4096, 100_000]), inv_freq(16, 10000.0, 4096, 16.0)
    w = torch.rand(48, generator=gen) + 0.5
    for rotary in (None, (pos, f)):
        got = kops.rms_norm(x, w, 1e-6, dtype, rotary)
        assert torch.equal(got, kops.rms_norm(x.contiguous(), w, 1e-6, dtype, rotary))
        assert torch.equal(
            kops.rms_norm(joined[:, :40], None, 1e-6, dtype),
            kops.rms_norm(joined[:, :40].contiguous(), None, 1e-6, dtype),
        )
    assert torch.equal(kops.rope(x, pos, f, False), kops.rope(x.contiguous(), pos, f, False))


@pytest.mark.parametrize(
    "shape,dim", [((6, 4, 64), 32), ((3, 2, 128), 64), ((2, 16), 16)], ids=["heads", "wide", "all-rope"]
)
@pytest.mark.parametrize("inverse", [False, True])
def test_rope_with_hadamard_is_the_two_ops(kops, dtype, gen, shape, dim, inverse):
    """One launch, kv_format.hadamard of rope's output (rounded to x's dtype in between), fp32."""
    x = torch.randn(shape, generator=gen).to(dtype)
    pos = torch.tensor([0, 1, 7, 4096, 100_000, 3][: shape[0]])
    f = inv_freq(dim, 10000.0, 4096, 16.0)
    want = hadamard(ref.rope(x, pos, f, inverse))
    got = kops.rope(x, pos, f, inverse, True)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got, want, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=1e-5)
    # the same rotated values as the backend's own rope (up to the fp32 sum's order)
    torch.testing.assert_close(got, hadamard(kops.rope(x, pos, f, inverse)), atol=1e-5, rtol=1e-5)
    assert torch.equal(ref.rope(x, pos, f, inverse, hadamard=True), want)
    with pytest.raises(ValueError, match="power-of-two"):
        kops.rope(torch.zeros(2, 48, dtype=dtype), pos[:2], f[:8], False, True)
