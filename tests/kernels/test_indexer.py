"""Triton indexer top-k (interpreter) against the reference."""

import pytest
import torch

from v4d.kernels import reference as ref


def as_sets(idx: torch.Tensor) -> list[list[int]]:
    return [sorted(row) for row in idx.tolist()]


@pytest.mark.parametrize("k", [1, 5, 30, 37])
def test_topk_selects_the_same_set(kops, gen, k):
    scores = torch.randn(6, 30, generator=gen) * 100
    scores[1, 4:] = float("-inf")  # fewer visible than k
    scores[2] = float("-inf")  # nothing visible
    scores[3, ::2] = -scores[3, ::2].abs()  # negative scores still count
    got = kops.indexer_topk(scores, k)
    assert got.dtype == torch.int32 and got.shape == (6, k)
    assert as_sets(got) == as_sets(ref.indexer_topk(scores, k))
    assert (got[2] == -1).all()
    valid = got[1][got[1] >= 0]
    assert len(valid) == min(k, 4) and set(valid.tolist()) <= {0, 1, 2, 3}


def test_topk_ties_take_lowest_indices_in_index_order(kops):
    inf = float("-inf")
    scores = torch.tensor([[1.0, 1.0, 1.0, 2.0, inf, 1.0], [-0.0, 0.0, -1.0, -3.0, 5.0, inf]])
    got = kops.indexer_topk(scores, 3)
    assert got.tolist() == [[0, 1, 3], [0, 1, 4]]


def test_topk_many_ties_match_reference_exactly(kops, gen):
    """ReLU scores are often exactly 0: ties at the k-th score must resolve like the reference."""
    scores = torch.relu(torch.randn(5, 2500, generator=gen)).round()  # ties across blocks
    scores[2, 1100:] = float("-inf")
    for k in (40, 1500):
        assert as_sets(kops.indexer_topk(scores, k)) == as_sets(ref.indexer_topk(scores, k))


def test_topk_large_row_spans_blocks(kops, gen):
    scores = torch.randn(2, 3000, generator=gen)
    got = kops.indexer_topk(scores, 64)
    assert as_sets(got) == as_sets(ref.indexer_topk(scores, 64))


def test_topk_as_attention_rows_after_a_prefix(kops, gen):
    """With a block table: entry s of row t -> offset + table[seq[t], s // E] * E + s % E, after the
    prefix columns (the window's indices); -1 stays -1."""
    e, k, offset = 4, 5, 100
    scores = torch.randn(3, 12, generator=gen)
    scores[2, 3:] = float("-inf")  # three visible: two slots left over
    table = torch.tensor([[7, 2, 5], [1, 0, 3]])
    seq = torch.tensor([0, 1, 1])
    prefix = torch.randint(-1, 50, (3, 6), generator=gen)
    got = kops.indexer_topk(scores, k, (table, seq, e, offset), prefix)
    want = ref.indexer_topk(scores, k, (table, seq, e, offset), prefix)
    assert got.shape == (3, 6 + k) and got.dtype == torch.int32
    assert got[:, :6].tolist() == prefix.tolist()
    assert as_sets(got[:, 6:]) == as_sets(want[:, 6:])
    chosen = ref.indexer_topk(scores, k)
    for t in range(3):
        rows = {offset + int(table[seq[t], s // e]) * e + s % e if s >= 0 else -1 for s in chosen[t].tolist()}
        assert set(got[t, 6:].tolist()) == rows
    assert sorted(got[2, 6:].tolist())[:2] == [-1, -1]
