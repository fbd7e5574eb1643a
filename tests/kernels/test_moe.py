"""Triton grouped-GEMM MoE (interpreter) against the reference."""

import pytest
import torch

from v4d.kernels import reference as ref


def experts(gen, e, inter, d, dtype):
    w1 = torch.randn(e, inter, d, generator=gen) / d**0.5
    w3 = torch.randn(e, inter, d, generator=gen) / d**0.5
    w2 = torch.randn(e, d, inter, generator=gen) / inter**0.5
    return w1.to(dtype), w3.to(dtype), w2.to(dtype)


@pytest.mark.parametrize(
    "t,d,inter,e,k,limit",
    [(13, 32, 48, 5, 3, 1.0), (4, 64, 32, 8, 6, 10.0), (21, 24, 40, 3, 2, 0.0)],
    ids=["ragged", "v4-topk6", "no-clamp"],
)
def test_matches_reference(kops, dtype, gen, t, d, inter, e, k, limit, tol):
    x = torch.randn(t, d, generator=gen).to(dtype)
    ids = torch.randint(-1, e + 2, (t, k), generator=gen)  # -1 and >= e: not local
    ids[0] = -1  # a token with no local expert
    weights = torch.rand(t, k, generator=gen)
    w1, w3, w2 = experts(gen, e, inter, d, dtype)
    y = kops.moe_experts(x, ids, weights, w1, w3, w2, limit)
    assert y.dtype == dtype and y.shape == (t, d)
    torch.testing.assert_close(y, ref.moe_experts(x, ids, weights, w1, w3, w2, limit), **tol(dtype))
    assert (y[0] == 0).all()


def test_one_expert_many_tiles_and_empty(kops, gen, tol):
    w1, w3, w2 = experts(gen, 2, 16, 16, torch.float32)
    x = torch.randn(40, 16, generator=gen)
    ids = torch.zeros(40, 1, dtype=torch.int32)  # 40 pairs on expert 0: 3 tiles
    w = torch.rand(40, 1, generator=gen)
    torch.testing.assert_close(
        kops.moe_experts(x, ids, w, w1, w3, w2, 10.0),
        ref.moe_experts(x, ids, w, w1, w3, w2, 10.0),
        **tol(torch.float32),
    )
    none = kops.moe_experts(x, torch.full((40, 1), -1), w, w1, w3, w2, 10.0)
    assert (none == 0).all()


def test_broadcast_ids_and_weights(kops, gen):
    """Expanded (stride-0) ids and weights read like real ones."""
    x = torch.randn(7, 32, generator=gen)
    w1, w3, w2 = experts(gen, 1, 48, 32, torch.float32)
    ids, weights = torch.zeros(1, 1, dtype=torch.long).expand(7, 1), torch.ones(1, 1).expand(7, 1)
    y = kops.moe_experts(x, ids, weights, w1, w3, w2, 10.0)
    torch.testing.assert_close(
        y, ref.moe_experts(x, ids.clone(), weights.clone(), w1, w3, w2, 10.0), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(
    "t,k,e,bm", [(37, 1, 16, 16), (6, 1, 1, 16), (350, 2, 300, 16), (5, 1, 8, 4), (29, 6, 12, 16), (90, 3, 5, 16)]
)
def test_tile_schedule_sorts_and_covers_each_experts_pairs(kops, gen, t, k, e, bm):
    """The one-launch schedule against a plain loop over the pairs p = t * k + j of ids [T, k] (here
    a strided view; ids outside [0, e) are not local): the local pairs in expert order, stable (the
    counting sort), and for each expert ceil(count / bm) tiles of its rows, then -1 tiles up to the bound."""
    from v4d.kernels.moe import _tile_schedule

    ids = torch.randint(-1, e + 2, (t, 2 * k), generator=gen)[:, ::2]
    bound = min(t * k, -(-(t * k) // bm) + e)
    order, tile_e, tile_row, tile_end = (x.cpu().tolist() for x in _tile_schedule(ids.to(kops.device), e, bm, bound))
    flat = ids.reshape(-1).tolist()
    want_order = [p for x in range(e) for p, ex in enumerate(flat) if ex == x]
    want, start = [], 0
    for x in range(e):
        n = flat.count(x)
        want += [(x, row, start + n) for row in range(start, start + n, bm)]
        start += n
    assert order[: len(want_order)] == want_order
    assert len(want) <= bound
    assert list(zip(tile_e, tile_row, tile_end, strict=True))[: len(want)] == want
    assert tile_e[len(want) :] == [-1] * (bound - len(want))


@pytest.mark.parametrize("add_dtype", [None, torch.float32], ids=["add-x-dtype", "add-fp32"])
def test_add_in_the_combine_equals_adding_the_outputs(kops, dtype, gen, tol, add_dtype):
    """With `add` (the shared expert adding the routed output) the result is add + y as torch adds
    the two tensors (y rounded to x's dtype first), including tokens with no local expert."""
    t, d, inter, e = 9, 32, 48, 4
    x = torch.randn(t, d, generator=gen).to(dtype)
    ids = torch.randint(-1, e, (t, 2), generator=gen)
    ids[0] = -1
    weights = torch.rand(t, 2, generator=gen)
    add = torch.randn(t, d, generator=gen).to(add_dtype or dtype)
    w1, w3, w2 = experts(gen, e, inter, d, dtype)
    got = kops.moe_experts(x, ids, weights, w1, w3, w2, 10.0, None, add)
    y = kops.moe_experts(x, ids, weights, w1, w3, w2, 10.0)
    assert got.dtype == dtype
    if dtype == torch.bfloat16 and kops.device.type == "cpu":  # the interpreter rounds bf16 by truncation
        torch.testing.assert_close(got, (add + y).to(dtype), atol=0, rtol=2**-7)
    else:
        assert torch.equal(got, (add + y).to(dtype))
    torch.testing.assert_close(got, ref.moe_experts(x, ids, weights, w1, w3, w2, 10.0, None, add), **tol(dtype))


@pytest.mark.parametrize("t", [0, 1, 37], ids=lambda t: f"t{t}")
@pytest.mark.parametrize("add_dtype", [None, "x", torch.float32], ids=["no-add", "add-x-dtype", "add-fp32"])
def test_dense_expert_is_the_routed_call_through_expert_0(kops, dtype, gen, tol, t, add_dtype):
    """The shared expert's 2-launch path (no schedule, no combine) gives bit for bit what `moe_experts`
    gives with every token routed to expert 0 with weight 1 (37 tokens: several tiles, the last ragged),
    and matches the reference."""
    d, inter = 32, 48
    x = torch.randn(t, d, generator=gen).to(dtype)
    w1, w3, w2 = (w[0] for w in experts(gen, 1, inter, d, dtype))
    add = None if add_dtype is None else torch.randn(t, d, generator=gen).to(dtype if add_dtype == "x" else add_dtype)
    got = kops.dense_expert(x, w1, w3, w2, 1.0, add)
    ids, weights = torch.zeros(t, 1, dtype=torch.long), torch.ones(t, 1)
    routed = kops.moe_experts(x, ids, weights, w1[None], w3[None], w2[None], 1.0, None, add)
    assert got.dtype == dtype and got.shape == (t, d)
    assert torch.equal(got, routed)
    torch.testing.assert_close(got, ref.dense_expert(x, w1, w3, w2, 1.0, add), **tol(dtype))
    torch.testing.assert_close(
        ref.dense_expert(x, w1, w3, w2, 1.0, add),
        ref.moe_experts(x, ids, weights, w1[None], w3[None], w2[None], 1.0, None, add),
        **tol(dtype),
    )
