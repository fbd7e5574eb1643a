"""Triton gated pooling (interpreter) against the reference, in CSA and HCA shapes."""

import pytest
import torch

from v4d.kernels import reference as ref


def csa_candidates(kv: torch.Tensor, gate: torch.Tensor, m: int = 4):
    """The 8 overlapped candidates per entry from [n, 2c] maps: previous block (first c channels,
    -inf gates for entry 0) then the current block (last c channels)."""
    n, c2 = kv.shape
    c = c2 // 2
    kv, gate = kv.view(n // m, m, c2), gate.view(n // m, m, c2)
    v = torch.zeros(n // m, 2 * m, c)
    g = torch.full((n // m, 2 * m, c), float("-inf"))
    v[:, m:], g[:, m:] = kv[:, :, c:], gate[:, :, c:]
    v[1:, :m], g[1:, :m] = kv[:-1, :, :c], gate[:-1, :, :c]
    return v, g


def test_csa_prefill_overlapped(kops, dtype, gen, tol):
    kv, gate = torch.randn(16, 2 * 40, generator=gen), torch.randn(16, 2 * 40, generator=gen)
    v, g = csa_candidates(kv, gate)
    v, g = v.to(dtype), g.to(dtype)
    got = kops.gated_pool(v, g)
    assert got.shape == (4, 40) and got.dtype == dtype
    torch.testing.assert_close(got, ref.gated_pool(v, g), **tol(dtype))


@pytest.mark.parametrize("b", [1, 3], ids=["decode-close", "prefill"])
def test_hca_128_token_pool(kops, dtype, gen, b, tol):
    v = torch.randn(b, 128, 512, generator=gen).to(dtype)
    g = (torch.randn(b, 128, 512, generator=gen) * 4).to(dtype)
    torch.testing.assert_close(kops.gated_pool(v, g), ref.gated_pool(v, g), **tol(dtype))


def test_ragged_and_fully_masked_channels(kops, gen, tol):
    v, g = torch.randn(5, 7, 33, generator=gen), torch.randn(5, 7, 33, generator=gen)
    g[2, :, :5] = float("-inf")
    g[3, :6] = float("-inf")
    got = kops.gated_pool(v, g)
    torch.testing.assert_close(got, ref.gated_pool(v, g), **tol(torch.float32))
    assert (got[2, :5] == 0).all()
    torch.testing.assert_close(got[3], v[3, 6])
