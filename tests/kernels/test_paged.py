"""Triton paged ops (interpreter on the CPU) against the references, in plain and packed formats."""

import pytest
import torch

from v4d.kernels import kv_format
from v4d.kernels import reference as ref


def _store(rows: torch.Tensor, fmt: str, rope_dim: int | None) -> torch.Tensor:
    if fmt == "deployed":
        return kv_format.pack_main(rows, rope_dim) if rope_dim is not None else kv_format.pack_index(rows)
    return rows.to(torch.float32 if fmt == "fp32" else torch.bfloat16)


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "deployed"])
@pytest.mark.parametrize(
    "t,h,d,rope,n,r,s,k", [(5, 4, 64, 16, 6, 24, 40, 20), (3, 16, 512, 64, 3, 16, 64, 30)], ids=["small", "v4-dims"]
)
def test_paged_attention_matches_reference(kops, gen, tol, fmt, t, h, d, rope, n, r, s, k):
    q = torch.randn(t, h, d, generator=gen)
    kv = _store(torch.randn(n, d, generator=gen), fmt, rope)
    ring = _store(torch.randn(r, d, generator=gen), fmt, rope)
    store = _store(torch.randn(s, d, generator=gen), fmt, rope)
    idx = torch.randint(-1, n + r + s, (t, k), generator=gen, dtype=torch.int32)
    idx[0] = -1
    idx[1, :3] = torch.tensor([0, n, n + r])  # one of each source
    sink = torch.randn(h, generator=gen)
    o = kops.paged_sparse_attention(q, kv, ring, store, idx, sink, d**-0.5, rope)
    want = ref.paged_sparse_attention(q, kv, ring, store, idx, sink, d**-0.5, rope)
    torch.testing.assert_close(o, want, **tol(torch.float32))
    assert torch.all(o[0] == 0)
    # without a page store (SWA layers) only the fresh rows and rings are addressed
    idx2 = idx.clamp(max=n + r - 1)
    torch.testing.assert_close(
        kops.paged_sparse_attention(q, kv, ring, None, idx2, sink, 0.1, rope),
        ref.paged_sparse_attention(q, kv, ring, None, idx2, sink, 0.1, rope),
        **tol(torch.float32),
    )


@pytest.mark.parametrize("fmt", ["fp32", "deployed"])
@pytest.mark.parametrize("splits", [2, 5])
def test_paged_attention_split_rows_merge_to_the_reference(kops, gen, tol, split_into, fmt, splits):
    """Flash-decoding: each row's indices split across programs (a GPU does this for small batches),
    partial states merged with the sink, equal the one-pass result; rows with no valid index stay 0."""
    from v4d.kernels import paged

    split_into(paged, splits)
    t, h, d, rope, n, r, s, k = 3, 4, 64, 16, 4, 24, 40, 300  # 2 or 3 splits of 128-index blocks
    q = torch.randn(t, h, d, generator=gen)
    kv, ring, store = (_store(torch.randn(m, d, generator=gen), fmt, rope) for m in (n, r, s))
    idx = torch.randint(-1, n + r + s, (t, k), generator=gen, dtype=torch.int32)
    idx[0] = -1
    idx[1, 100:] = -1  # whole splits without a valid index
    sink = torch.randn(h, generator=gen)
    o = kops.paged_sparse_attention(q, kv, ring, store, idx, sink, d**-0.5, rope)
    torch.testing.assert_close(
        o, ref.paged_sparse_attention(q, kv, ring, store, idx, sink, d**-0.5, rope), **tol(torch.float32)
    )
    assert torch.all(o[0] == 0)


@pytest.mark.parametrize("splits", [1, 3], ids=["one-pass", "split-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_paged_attention_unrotates_its_output_as_rope_after_it(kops, gen, split_into, splits, dtype):
    """`unrotate`: the output's inverse RoPE in the attention's launch (or its merge) is bitwise the
    `rope(..., inverse=True)` launch after it: the rows as stored, rotated by the same helper."""
    from v4d.kernels import paged

    split_into(paged, splits)
    t, h, d, rope, n, r, s, k = 3, 4, 64, 16, 4, 24, 40, 300
    q = torch.randn(t, h, d, generator=gen).to(dtype)
    kv, ring, store = (_store(torch.randn(m, d, generator=gen), "deployed", rope) for m in (n, r, s))
    idx = torch.randint(-1, n + r + s, (t, k), generator=gen, dtype=torch.int32)
    sink, pos = torch.randn(h, generator=gen), torch.tensor([3, 700, 65000])
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rope, 2) / rope))
    o = kops.paged_sparse_attention(q, kv, ring, store, idx, sink, d**-0.5, rope)
    got = kops.paged_sparse_attention(q, kv, ring, store, idx, sink, d**-0.5, rope, (pos, inv_freq))
    assert torch.equal(got, kops.rope(o, pos, inv_freq, True))
    want = ref.paged_sparse_attention(q, kv, ring, store, idx, sink, d**-0.5, rope, (pos, inv_freq))
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("splits", [1, 3], ids=["one-pass", "split-rows"])
@pytest.mark.parametrize("gain", [False, True], ids=["no-gain", "gain"])
def test_paged_attention_normalises_its_queries_as_rms_norm_before_it(kops, gen, split_into, splits, dtype, gain):
    """`q_norm`: the query heads normalised (per head, over D) and roped in the attention's launch
    equal the `rms_norm(q, w, eps, q.dtype, rotary)` launch before it; q read in place from a column
    slice of a joined projection (tokens at any stride)."""
    from v4d.kernels import ops, paged

    split_into(paged, splits)
    t, h, d, rope, n, r, s, k = 3, 4, 64, 16, 4, 24, 40, 300
    joined = (torch.randn(t, h * d + 24, generator=gen) * 3).to(dtype)
    q = joined[:, 8 : 8 + h * d].unflatten(-1, (h, d))
    kv, ring, store = (_store(torch.randn(m, d, generator=gen), "deployed", rope) for m in (n, r, s))
    idx = torch.randint(-1, n + r + s, (t, k), generator=gen, dtype=torch.int32)
    sink, pos = torch.randn(h, generator=gen), torch.tensor([3, 700, 65000])
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rope, 2) / rope))
    weight = torch.rand(d, generator=gen) + 0.5 if gain else None
    norm = ops.RowNorm(weight, 1e-6, (pos, inv_freq))
    got = kops.paged_sparse_attention(q, kv, ring, store, idx, sink, d**-0.5, rope, None, norm)
    normed = kops.rms_norm(q, weight, 1e-6, dtype, (pos, inv_freq))
    want = kops.paged_sparse_attention(normed, kv, ring, store, idx, sink, d**-0.5, rope)
    # one per-head sum of squares in another order than rms_norm's: a query value may round an ulp apart
    torch.testing.assert_close(got.float(), want.float(), atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=1e-5)
    ref_o = ref.paged_sparse_attention(q, kv, ring, store, idx, sink, d**-0.5, rope, None, norm)
    torch.testing.assert_close(got.float(), ref_o.float(), atol=2e-2, rtol=2e-2)


def test_paged_attention_equals_sparse_attention_over_the_concatenation(gen):
    """The index space is the concatenation [kv; ring; store], read in place."""
    q, kv, ring, store = (torch.randn(*s, generator=gen) for s in ((4, 2, 32), (3, 32), (5, 32), (7, 32)))
    idx = torch.randint(-1, 15, (4, 9), generator=gen)
    sink = torch.randn(2, generator=gen)
    torch.testing.assert_close(
        ref.paged_sparse_attention(q, kv, ring, store, idx, sink, 0.2, 8),
        ref.sparse_attention(q, torch.cat([kv, ring, store]), idx, sink, 0.2),
    )


@pytest.mark.parametrize("overlap", [True, False])
def test_gated_pool_indexed_matches_reference(kops, gen, tol, overlap):
    n, r, w, e = 9, 16, 64, 5
    length = 8 if overlap else 16
    kv, score = torch.randn(n, w, generator=gen), torch.randn(n, w, generator=gen)
    skv, sscore = torch.randn(r, w, generator=gen), torch.randn(r, w, generator=gen)
    idx = torch.randint(-1, n + r, (e, length), generator=gen)
    idx[0] = -1  # an entry of padding only pools to 0
    ape = torch.randn(4, w, generator=gen)
    out = kops.gated_pool_indexed(kv, score, skv, sscore, idx, overlap, ape)
    want = ref.gated_pool_indexed(kv, score, skv, sscore, idx, overlap, ape)
    assert out.shape == (e, w // 2 if overlap else w)
    torch.testing.assert_close(out, want, **tol(torch.float32))
    assert torch.all(out[0] == 0)
    # values | gates side by side, as the compressor's projection and tail rings hold them: row-strided views
    joint, tail = torch.cat([kv, score], 1), torch.cat([skv, sscore], 1)
    views = (joint[:, :w], joint[:, w:], tail[:, :w], tail[:, w:])
    torch.testing.assert_close(kops.gated_pool_indexed(*views, idx, overlap, ape), want, **tol(torch.float32))
    # entries stored in the model's dtype, from a 16-bit ape (both cast in the kernel): as casting after
    for dt in (torch.bfloat16, torch.float16):
        got = kops.gated_pool_indexed(kv, score, skv, sscore, idx, overlap, ape.to(dt), dt)
        assert got.dtype == dt
        torch.testing.assert_close(
            got, ref.gated_pool_indexed(kv, score, skv, sscore, idx, overlap, ape.to(dt)).to(dt), **tol(dt)
        )


def test_gated_pool_indexed_equals_gated_pool_of_the_gathered_candidates(gen):
    """Candidate slot l's gate gets ape[l % ratio]: the bias of its position in the block."""
    kv, score = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    skv, sscore = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    idx = torch.tensor([[0, 1, 7, 9], [2, 3, 4, 5]])
    ape = torch.randn(2, 8, generator=gen)
    allv, alls = torch.cat([kv, skv]), torch.cat([score, sscore])
    torch.testing.assert_close(
        ref.gated_pool_indexed(kv, score, skv, sscore, idx, False, ape),
        ref.gated_pool(allv[idx], alls[idx] + ape[[0, 1, 0, 1]]),
    )


@pytest.mark.parametrize("fmt", ["fp32", "deployed"])
def test_paged_indexer_scores_match_reference(kops, gen, tol, fmt):
    pages, e, d, h = 6, 8, 32, 4
    keys = _store(torch.randn(pages * e, d, generator=gen), fmt, None).unflatten(0, (pages, e))
    table = torch.tensor([[5, 0, -1], [2, 4, 1]])
    seq = torch.tensor([0, 0, 1, 1, 1])
    n_vis = torch.tensor([3, 16, 0, 9, 24])
    q, w = torch.randn(5, h, d, generator=gen), torch.randn(5, h, generator=gen)
    got = kops.paged_indexer_scores(q, w, keys, table, seq, n_vis, 0.3)
    want = ref.paged_indexer_scores(q, w, keys, table, seq, n_vis, 0.3)
    assert got.shape == (5, 3 * e)
    torch.testing.assert_close(got, want, **tol(torch.float32))
    # column s of a row is entry s of its sequence: page table[seq, s // e], offset s % e
    flat = kv_format.load_rows(keys, d, None).flatten(0, 1)
    seq_keys = flat[torch.tensor([2 * e + i for i in range(e)] + [4 * e + i for i in range(e)])]
    torch.testing.assert_close(
        want[3, :9], ref.indexer_scores(q[3:4], w[3:4] * 0.3, seq_keys, torch.tensor([9]))[0, :9]
    )
