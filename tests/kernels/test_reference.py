"""The torch references against hand-computed values and dense formulations."""

import math

import pytest
import torch

from v4d.kernels import reference as ref


def test_sparse_attention_single_entry_by_hand():
    q = torch.tensor([[[1.0, 2.0]]])
    kv = torch.tensor([[0.5, -1.0], [3.0, 3.0]])
    idx = torch.tensor([[1, -1]], dtype=torch.int32)
    sink = torch.tensor([0.25])
    z = 0.5 * (1 * 3 + 2 * 3)
    p = math.exp(z) / (math.exp(z) + math.exp(0.25))
    o = ref.sparse_attention(q, kv, idx, sink, 0.5)
    torch.testing.assert_close(o, torch.tensor([[[3 * p, 3 * p]]]))


def test_sparse_attention_equals_dense_mask_with_sink_column(gen):
    t, h, d, n, k = 6, 3, 8, 10, 5
    q = torch.randn(t, h, d, generator=gen)
    kv = torch.randn(n, d, generator=gen)
    idx = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(t)]).int()
    idx[1, 2:] = -1
    idx[4] = -1  # an empty row
    sink = torch.randn(h, generator=gen)
    o = ref.sparse_attention(q, kv, idx, sink, 0.3)

    mask = torch.full((t, n), float("-inf"))
    for i in range(t):
        for j in idx[i].tolist():
            if j >= 0:
                mask[i, j] = 0.0
    logits = torch.einsum("thd,nd->thn", q, kv) * 0.3 + mask[:, None, :]
    logits = torch.cat([logits, sink[None, :, None].expand(t, h, 1)], dim=-1)
    dense = torch.einsum("thn,nd->thd", torch.softmax(logits, -1)[..., :n], kv)
    torch.testing.assert_close(o, dense)
    assert torch.all(o[4] == 0)


def test_indexer_scores_by_hand():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # T=1, Hi=2, Di=2
    w = torch.tensor([[2.0, 3.0]])
    k = torch.tensor([[1.0, -1.0], [2.0, 5.0], [9.0, 9.0]])
    s = ref.indexer_scores(q, w, k, torch.tensor([2]))
    # s0 = 2*relu(1) + 3*relu(-1) = 2; s1 = 2*2 + 3*5 = 19; s2 hidden
    assert s.tolist() == [[2.0, 19.0, float("-inf")]]


def test_indexer_topk_pads_with_minus_one():
    inf = float("-inf")
    scores = torch.tensor([[0.5, 3.0, -1.0, 2.0], [1.0, inf, inf, inf], [inf, inf, inf, inf]])
    idx = ref.indexer_topk(scores, 3)
    assert idx.dtype == torch.int32
    assert idx.tolist() == [[1, 3, 0], [0, -1, -1], [-1, -1, -1]]
    assert ref.indexer_topk(scores, 6)[0].tolist() == [1, 3, 0, 2, -1, -1]
    ties = torch.zeros(2, 3000)
    ties[:, 2500] = 1.0
    ties[1, ::3] = float("-inf")
    assert ref.indexer_topk(ties, 4).tolist() == [[2500, 0, 1, 2], [2500, 1, 2, 4]]


def test_indexer_topk_equals_a_stable_sort():
    """topk + tie fix-up == the stable full sort's first k (descending, ties by index), -inf as -1."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (64, 700), generator=g).float()  # many ties at the k-th score
    scores[::3, 400:] = float("-inf")
    scores[5, 3:] = float("-inf")  # fewer finite scores than k
    scores[7] = torch.randn(700, generator=g)  # no ties
    for k in (1, 37, 256, 700, 900):
        vals, order = torch.sort(scores, dim=-1, descending=True, stable=True)
        kk = min(k, 700)
        want = torch.where(torch.isfinite(vals[:, :kk]), order[:, :kk], -1)
        assert ref.indexer_topk(scores, k)[:, :kk].tolist() == want.tolist()


def test_gated_pool_by_hand_and_padding():
    values = torch.tensor([[[1.0, 10.0], [3.0, 20.0]]])  # B=1, L=2, C=2
    gates = torch.tensor([[[0.0, float("-inf")], [math.log(3.0), 0.0]]])
    out = ref.gated_pool(values, gates)
    # channel 0: weights 1/4, 3/4 -> 2.5; channel 1: only slot 1 -> 20
    torch.testing.assert_close(out, torch.tensor([[2.5, 20.0]]))
    empty = ref.gated_pool(values, torch.full_like(gates, float("-inf")))
    assert torch.all(empty == 0)


@pytest.mark.parametrize("dense_macs", [0, ref.DENSE_MACS], ids=["loop", "dense"])
def test_moe_experts_per_token_loop(gen, monkeypatch, dense_macs):
    monkeypatch.setattr(ref, "DENSE_MACS", dense_macs)  # both ways of computing it
    t, d, inter, e, k, lim = 5, 6, 4, 3, 2, 1.5
    x = torch.randn(t, d, generator=gen)
    ids = torch.tensor([[0, 2], [1, -1], [-1, -1], [2, 2], [7, 0]])  # 7: not a local expert
    wts = torch.rand(t, k, generator=gen)
    w1, w3 = torch.randn(e, inter, d, generator=gen), torch.randn(e, inter, d, generator=gen)
    w2 = torch.randn(e, d, inter, generator=gen)
    y = ref.moe_experts(x, ids, wts, w1, w3, w2, lim)
    want = torch.zeros(t, d)
    for i in range(t):
        for j in range(k):
            ex = int(ids[i, j])
            if 0 <= ex < e:
                g = torch.clamp(w1[ex] @ x[i], max=lim)
                u = torch.clamp(w3[ex] @ x[i], -lim, lim)
                want[i] += wts[i, j] * (w2[ex] @ (g * torch.sigmoid(g) * u))
    torch.testing.assert_close(y, want)
    assert torch.all(y[2] == 0)


def test_sinkhorn_split_is_doubly_stochastic(gen):
    n, t = 4, 7
    mixes = torch.randn(t, (2 + n) * n, generator=gen)
    scale, base = torch.tensor([0.7, 1.3, 2.0]), torch.randn((2 + n) * n, generator=gen)
    pre, post, comb = ref.hc_split_sinkhorn(mixes, scale, base, n, 20, 1e-6)
    torch.testing.assert_close(pre, torch.sigmoid(mixes[:, :n] * 0.7 + base[:n]) + 1e-6)
    torch.testing.assert_close(post, 2 * torch.sigmoid(mixes[:, n : 2 * n] * 1.3 + base[n : 2 * n]))
    assert comb.shape == (t, n, n) and torch.all(comb > 0)
    torch.testing.assert_close(comb.sum(-2), torch.ones(t, n), atol=1e-5, rtol=0)  # columns exact
    torch.testing.assert_close(comb.sum(-1), torch.ones(t, n), atol=2e-2, rtol=0)  # rows approx
    _, _, c200 = ref.hc_split_sinkhorn(mixes, scale, base, n, 200, 1e-6)
    torch.testing.assert_close(c200.sum(-1), torch.ones(t, n), atol=1e-3, rtol=0)  # ... converging
    # One round only: row softmax (+eps) then one column normalisation.
    _, _, c1 = ref.hc_split_sinkhorn(mixes, scale, base, n, 1, 0.0)
    sm = torch.softmax((mixes[:, 2 * n :] * 2.0 + base[2 * n :]).view(t, n, n), -1)
    torch.testing.assert_close(c1, sm / sm.sum(-2, keepdim=True))


def test_hc_pre_post_by_loops(gen):
    t, n, d = 3, 4, 5
    X = torch.randn(t, n, d, generator=gen)
    pre, post = torch.rand(t, n, generator=gen), torch.rand(t, n, generator=gen)
    comb, f = torch.rand(t, n, n, generator=gen), torch.randn(t, d, generator=gen)
    x = ref.hc_pre(X, pre)
    Xn = ref.hc_post(f, X, post, comb)
    for i in range(t):
        torch.testing.assert_close(x[i], sum(pre[i, kk] * X[i, kk] for kk in range(n)))
        for kk in range(n):
            want = post[i, kk] * f[i] + sum(comb[i, j, kk] * X[i, j] for j in range(n))
            torch.testing.assert_close(Xn[i, kk], want)


def test_references_keep_input_dtype(gen):
    q = torch.randn(2, 2, 4, generator=gen).half()
    kv = torch.randn(3, 4, generator=gen).half()
    o = ref.sparse_attention(q, kv, torch.tensor([[0, 1], [2, -1]]), torch.zeros(2), 0.5)
    assert o.dtype == torch.float16
    s = ref.indexer_scores(q, torch.ones(2, 2).half(), kv, torch.tensor([3, 1]))
    assert s.dtype == torch.float32


@pytest.mark.parametrize("mode", ["reference", "auto"])
def test_ops_cpu_dispatch_uses_reference(monkeypatch, mode, gen):
    from v4d.kernels import ops

    monkeypatch.setenv("V4D_KERNELS", mode)
    assert ops.backend(torch.device("cpu")) is ref


def test_ops_rejects_bad_shapes_and_modes(monkeypatch):
    from v4d.kernels import ops

    with pytest.raises(ValueError, match=r"paged_sparse_attention: expected kv rows of width 4"):
        ops.paged_sparse_attention(
            torch.zeros(2, 2, 4),
            torch.zeros(3, 5),
            torch.zeros(1, 4),
            None,
            torch.zeros(2, 1, dtype=torch.int32),
            torch.zeros(2),
            1.0,
            0,
        )
    with pytest.raises(ValueError, match=r"hc_pre: expected pre of shape \[2, 4\]"):
        ops.hc_pre(torch.zeros(2, 4, 8), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"moe_experts: expected w2 of shape \[3, 6, 4\]"):
        ops.moe_experts(
            torch.zeros(1, 6),
            torch.zeros(1, 2, dtype=torch.long),
            torch.zeros(1, 2),
            torch.zeros(3, 4, 6),
            torch.zeros(3, 4, 6),
            torch.zeros(3, 4, 6),
            1.0,
        )
    with pytest.raises(ValueError, match=r"dense_expert: expected w2 of shape \[6, 4\]"):
        ops.dense_expert(torch.zeros(1, 6), torch.zeros(4, 6), torch.zeros(4, 6), torch.zeros(4, 6), 1.0)
    with pytest.raises(ValueError, match=r"dense_expert: expected add of shape \[1,6\]"):
        ops.dense_expert(
            torch.zeros(1, 6), torch.zeros(4, 6), torch.zeros(4, 6), torch.zeros(6, 4), 1.0, torch.zeros(2, 6)
        )
    monkeypatch.setenv("V4D_KERNELS", "cuda")
    with pytest.raises(ValueError, match="V4D_KERNELS='cuda': expected one of auto, reference, triton"):
        ops.indexer_topk(torch.zeros(1, 3), 1)
