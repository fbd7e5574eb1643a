"""Triton sparse attention (interpreter) against the reference."""

import pytest
import torch

from v4d.kernels import reference as ref


@pytest.mark.parametrize(
    "t,h,d,n,k",
    [(5, 4, 64, 30, 20), (2, 16, 512, 160, 40), (7, 5, 24, 9, 3)],
    ids=["small", "v4-head-dim", "ragged"],
)
def test_matches_reference(kops, dtype, gen, t, h, d, n, k, tol):
    q = torch.randn(t, h, d, generator=gen).to(dtype)
    kv = torch.randn(n, d, generator=gen).to(dtype)
    idx = torch.randint(-1, n, (t, k), generator=gen, dtype=torch.int32)
    idx[0] = -1  # an empty row -> zeros
    sink = torch.randn(h, generator=gen)
    o = kops.sparse_attention(q, kv, idx, sink, d**-0.5)
    assert o.dtype == dtype and o.shape == (t, h, d)
    torch.testing.assert_close(o, ref.sparse_attention(q, kv, idx, sink, d**-0.5), **tol(dtype))
    assert torch.all(o[0] == 0)


def test_window_plus_compressed_union_decode(kops, gen, tol):
    """Decode-shaped call: a window ring of 8 plus 3 of 6 compressed entries, int64 indices."""
    win, n_comp, h, d = 8, 6, 8, 32
    kv = torch.randn(win + n_comp, d, generator=gen)
    q = torch.randn(2, h, d, generator=gen)
    idx = torch.tensor([[*range(win), win + 0, win + 4, win + 5], [0, 1, 2, -1, -1, -1, -1, -1, win + 2, -1, -1]])
    sink = torch.zeros(h)
    o = kops.sparse_attention(q, kv, idx, sink, 0.2)
    torch.testing.assert_close(o, ref.sparse_attention(q, kv, idx, sink, 0.2), **tol(torch.float32))


def test_no_tokens(kops):
    o = kops.sparse_attention(
        torch.zeros(0, 2, 16), torch.zeros(4, 16), torch.zeros(0, 3, dtype=torch.int32), torch.zeros(2), 1.0
    )
    assert o.shape == (0, 2, 16)
