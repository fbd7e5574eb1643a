"""Triton MoE router and row copies (interpreter) against the references."""

import pytest
import torch

from v4d.kernels import reference as ref
from v4d.kernels import routing


@pytest.mark.parametrize("t,d,e,k", [(5, 48, 16, 2), (19, 200, 256, 6), (1, 64, 3, 3)], ids=["small", "v4", "all"])
@pytest.mark.parametrize("hashed", [False, True])
@pytest.mark.parametrize("splits", [1, 3], ids=["one-pass", "split-d"])
def test_moe_route_matches_reference(kops, dtype, gen, tol, split_into, t, d, e, k, hashed, splits):
    split_into(routing, splits)  # "v4" (d=200): 2 splits of 128 inputs, as a GPU does for few tokens
    x = torch.randn(t, d, generator=gen).to(dtype)
    w = (torch.randn(e, d, generator=gen) * 3 / d**0.5).to(dtype)
    bias = torch.randn(e, generator=gen)
    tid2eid = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(50)]).to(torch.int32)
    ids_in = torch.randint(0, 50, (t,), generator=gen)
    args = (x, w, None, k, 1.5, tid2eid, ids_in) if hashed else (x, w, bias, k, 1.5)
    weights, ids = kops.moe_route(*args)
    want_w, want_ids = ref.moe_route(*args, *((None, None) if not hashed else ()))
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32 and ids.shape == (t, k)
    assert ids.tolist() == want_ids.tolist()  # largest first, like torch.topk (no ties in random data)
    torch.testing.assert_close(weights, want_w, **tol(torch.float32))
    torch.testing.assert_close(weights.sum(-1), torch.full((t,), 1.5), **tol(torch.float32))


def test_moe_route_softplus_far_out(kops):
    """Logits past torch's threshold (20) and very negative ones (softplus ~ exp(z)) as the reference."""
    x = torch.tensor([[1.0], [-1.0]])
    w = torch.tensor([[30.0], [-60.0], [0.5], [-12.0]])
    weights, ids = kops.moe_route(x, w, torch.zeros(4), 4, 1.0)
    want_w, want_ids = ref.moe_route(x, w, torch.zeros(4), 4, 1.0, None, None)
    assert ids.tolist() == want_ids.tolist()
    torch.testing.assert_close(weights, want_w, atol=0, rtol=1e-5)


@pytest.mark.parametrize("dt", [torch.float32, torch.uint8], ids=["fp32", "packed"])
def test_copy_rows_matches_reference(kops, device, gen, dt):
    from v4d.kernels import ops  # in place, no result: called directly (kops moves results back)

    src = (torch.randn(6, 40, generator=gen) * 50).to(dt)
    dst = torch.zeros(3, 4, 40, dtype=dt)
    src_rows, dst_rows = torch.tensor([5, 0, 2]), torch.tensor([11, 3, 4])
    want = dst.clone().flatten(0, 1)
    ref.copy_rows(want, dst_rows, src, src_rows)
    out = dst.to(device)
    ops.copy_rows(out.flatten(0, 1), dst_rows.to(device), src.to(device), src_rows.to(device))
    assert torch.equal(out.cpu().flatten(0, 1), want)
    assert torch.equal(want[11], src[5]) and torch.equal(want[0], torch.zeros(40, dtype=dt))
