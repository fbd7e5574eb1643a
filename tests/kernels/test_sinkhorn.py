"""Triton mHC split/Sinkhorn and stream mixing (interpreter) against the reference."""

import pytest
import torch

from v4d.kernels import reference as ref
from v4d.kernels import sinkhorn


@pytest.mark.parametrize("n,iters", [(4, 20), (4, 1), (3, 7)], ids=["v4", "one-round", "padded-n"])
def test_split_sinkhorn(kops, gen, n, iters):
    t = 37
    mixes = torch.randn(t, (2 + n) * n, generator=gen) * 2
    scale, base = torch.rand(3, generator=gen) + 0.5, torch.randn((2 + n) * n, generator=gen)
    got = kops.hc_split_sinkhorn(mixes, scale, base, n, iters, 1e-6)
    want = ref.hc_split_sinkhorn(mixes, scale, base, n, iters, 1e-6)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[2].sum(-2), torch.ones(t, n), atol=1e-4, rtol=0)  # (s / (s + eps))


@pytest.mark.parametrize("t,n,d", [(5, 4, 64), (3, 3, 40)], ids=["v4", "ragged"])
def test_pre_and_post(kops, dtype, gen, t, n, d, tol):
    X = torch.randn(t, n, d, generator=gen).to(dtype)
    f = torch.randn(t, d, generator=gen).to(dtype)
    pre, post = torch.rand(t, n, generator=gen), torch.rand(t, n, generator=gen) * 2
    comb = torch.softmax(torch.randn(t, n, n, generator=gen), -1)
    x = kops.hc_pre(X, pre)
    Xn = kops.hc_post(f, X, post, comb)
    assert x.dtype == dtype and Xn.dtype == dtype
    torch.testing.assert_close(x, ref.hc_pre(X, pre), **tol(dtype))
    torch.testing.assert_close(Xn, ref.hc_post(f, X, post, comb), **tol(dtype))


@pytest.mark.parametrize("t,n,d", [(5, 4, 64), (3, 3, 40), (2, 4, 1100)], ids=["v4", "ragged", "wide"])
def test_pre_with_the_sublayer_norm(kops, dtype, gen, t, n, d, tol):
    """One launch, the result of hc_pre then rms_norm (x rounded to X's dtype in between)."""
    X = (torch.randn(t, n, d, generator=gen) * 3).to(dtype)
    pre = torch.rand(t, n, generator=gen)
    w = torch.rand(d, generator=gen) + 0.5
    got = kops.hc_pre(X, pre, (w, 1e-6))
    want = ref.rms_norm(ref.hc_pre(X, pre), w, 1e-6, dtype)
    assert got.dtype == dtype and got.shape == (t, d)
    torch.testing.assert_close(got, want, **tol(dtype))
    assert torch.equal(ref.hc_pre(X, pre, (w, 1e-6)), want)


@pytest.mark.parametrize("t,n,d,m", [(5, 4, 64, 24), (19, 4, 300, 4), (1, 3, 40, 15)], ids=["v4", "head", "ragged"])
@pytest.mark.parametrize("splits", [1, 3], ids=["one-pass", "split-inputs"])
def test_mixes_are_the_normalised_streams_times_fn(kops, dtype, gen, t, n, d, m, tol, split_into, splits):
    split_into(sinkhorn, splits)  # "head" (1,200 inputs): 2 splits of 1,024, as a GPU does for few tokens
    X = (torch.randn(t, n, d, generator=gen) * 3).to(dtype)
    fn = torch.randn(m, n * d, generator=gen) / (n * d) ** 0.5
    got = kops.hc_mixes(X, fn, 1e-6)
    want = ref.hc_mixes(X, fn, 1e-6)
    assert got.dtype == torch.float32 and got.shape == (t, m)
    torch.testing.assert_close(got, want, **tol(torch.float32))
    x = X.float().flatten(1)
    torch.testing.assert_close(
        want, (x / x.square().mean(-1, keepdim=True).add(1e-6).sqrt()) @ fn.T, **tol(torch.float32)
    )


@pytest.mark.parametrize("t", [1, 21])
@pytest.mark.parametrize("splits", [1, 3], ids=["one-pass", "split-inputs"])
def test_mixes_with_sinkhorn_in_one_launch_equal_the_two_ops(kops, dtype, gen, t, split_into, splits):
    """The fused mHC site (mixes, then the split of each program's own rows after a barrier) gives
    exactly the two launches' pre, post and comb, and the reference's."""
    split_into(sinkhorn, splits)
    n, d, iters = 4, 64, 20
    X = (torch.randn(t, n, d, generator=gen) * 3).to(dtype)
    fn = torch.randn((2 + n) * n, n * d, generator=gen) / (n * d) ** 0.5
    scale, base = torch.rand(3, generator=gen) + 0.5, torch.randn((2 + n) * n, generator=gen)
    got = kops.hc_mixes_sinkhorn(X, fn, 1e-6, scale, base, n, iters, 1e-6)
    two = kops.hc_split_sinkhorn(kops.hc_mixes(X, fn, 1e-6), scale, base, n, iters, 1e-6)
    want = ref.hc_mixes_sinkhorn(X, fn, 1e-6, scale, base, n, iters, 1e-6)
    for g, o, w in zip(got, two, want, strict=True):
        assert torch.equal(g, o)
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
