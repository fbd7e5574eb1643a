"""Two ways to run, one answer: full pass, chunked prefill, decode and batching agree (fp32)."""

from __future__ import annotations

import pytest
import torch

from v4d.serving import sizing
from v4d.serving.model.cache import KVCache, SeqCache

TOL = {"atol": 2e-4, "rtol": 1e-4}


def run_chunks(model, ids: torch.Tensor, chunks: list[int], decode_from: int) -> torch.Tensor:
    """Prefill ids[:decode_from] in the given chunk sizes (cycled), then decode one token at a time.
    Pages are handed out in reverse order so page ids never equal logical block numbers."""
    cfg = model.cfg
    n_pages = sizing.pages_for(cfg, len(ids))
    kv = KVCache(cfg, n_pages + 2, 3)
    seq = SeqCache(slot=2, page_ids=list(range(n_pages + 1, 1, -1)))
    out, pos, i = [], 0, 0
    while pos < len(ids):
        n = 1 if pos >= decode_from else min(chunks[i % len(chunks)], decode_from - pos)
        out.append(model([(ids[pos : pos + n], seq)], kv, all_logits=True)[0])
        pos, i = pos + n, i + 1
    assert seq.num_tokens == len(ids)
    return torch.cat(out)


@pytest.mark.parametrize("chunks", [[400], [128, 129], [37, 1, 90]])
def test_v4_tiny_chunked_prefill_then_decode_matches_full_pass(tiny, tokens, chunks):
    # v4-tiny has the real ratios (4 / 128) and the 128-token window: 420 tokens close three HCA blocks
    ids = tokens[:420]
    full = tiny.prefill_logits(ids)
    got = run_chunks(tiny, ids, chunks, decode_from=400)
    torch.testing.assert_close(got, full, **TOL)


@pytest.mark.parametrize("chunks", [[7], [16, 3], [5]])
def test_v4_tiny_fast_chunked_prefill_then_decode_matches_full_pass(tiny_fast, tokens, chunks):
    ids = tokens[:120]  # HCA ratio 16, window 8: seven closed HCA blocks, many window wraps
    full = tiny_fast.prefill_logits(ids)
    got = run_chunks(tiny_fast, ids, chunks, decode_from=80)
    torch.testing.assert_close(got, full, **TOL)


def test_batched_sequences_equal_each_alone(tiny_fast, tokens):
    """Three sequences in one call (a long prefill chunk, a short one, a decode step) give the logits
    each gets alone; their pages are interleaved in one pool."""
    cfg = tiny_fast.cfg
    lens = [(0, 50), (10, 13), (60, 1)]  # (tokens already cached, new tokens)
    seqs_ids = [tokens[s * 97 % 300 : s * 97 % 300 + a + b] for s, (a, b) in enumerate(lens)]
    kv = KVCache(cfg, 12, 4)
    seqs = [SeqCache(slot=3 - i, page_ids=[i, i + 3, i + 6, i + 9]) for i in range(3)]
    for seq, ids, (a, _) in zip(seqs, seqs_ids, lens, strict=True):
        if a:
            tiny_fast([(ids[:a], seq)], kv)
    batched = tiny_fast(
        [(ids[a:], seq) for seq, ids, (a, _) in zip(seqs, seqs_ids, lens, strict=True)], kv, all_logits=True
    )
    for ids, got in zip(seqs_ids, batched, strict=True):
        alone = tiny_fast.prefill_logits(ids)
        torch.testing.assert_close(got, alone[-got.shape[0] :], **TOL)


def test_changing_future_tokens_never_changes_earlier_logits(tiny, tokens):
    ids = tokens[:300].clone()
    base = tiny.prefill_logits(ids)
    for cut in (100, 131, 256):
        other = ids.clone()
        other[cut:] = (other[cut:] * 7 + 3) % tiny.cfg.vocab_size
        changed = tiny.prefill_logits(other)
        torch.testing.assert_close(changed[:cut], base[:cut], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(changed[cut:], base[cut:], atol=1e-3)


def test_mtp_block_runs_chunked_like_full(tiny_fast, tokens):
    ids = tokens[:40]
    nxt = torch.roll(ids, -1)
    kv, seq = tiny_fast.scratch_cache(len(ids), with_mtp=True)
    with torch.inference_mode():
        X, spans = tiny_fast.hidden([(ids, seq)], kv)
        full = tiny_fast.mtp_logits(X, nxt, spans, kv)
    kv, seq = tiny_fast.scratch_cache(len(ids), with_mtp=True)
    parts = []
    for lo, hi in ((0, 13), (13, 14), (14, 40)):
        with torch.inference_mode():
            X, spans = tiny_fast.hidden([(ids[lo:hi], seq)], kv)
            parts.append(tiny_fast.mtp_logits(X, nxt[lo:hi], spans, kv))
    assert full.shape == (40, tiny_fast.cfg.vocab_size)
    torch.testing.assert_close(torch.cat(parts), full, **TOL)
    # the MTP head is its own prediction, not a copy of the main head's
    assert not torch.allclose(full, tiny_fast.prefill_logits(ids), atol=1e-2)


def test_bad_batches_fail_clearly(tiny_fast):
    cfg = tiny_fast.cfg
    kv = KVCache(cfg, 1, 2)
    with pytest.raises(ValueError, match=r"page_ids: 300 tokens need 3 pages, got 1"):
        tiny_fast([(torch.zeros(300, dtype=torch.long), SeqCache(0, [0]))], kv)
    with pytest.raises(ValueError, match=r"batch\[0\]: token ids must be in 0..1023"):
        tiny_fast([([5000], SeqCache(0, [0]))], kv)
    with pytest.raises(ValueError, match="share one state slot"):
        tiny_fast([([1], SeqCache(1, [0])), ([2], SeqCache(1, [0]))], kv)
    with pytest.raises(ValueError, match=r"MTP layers need KVCache\(with_mtp=True\)"):
        with torch.inference_mode():
            X, spans = tiny_fast.hidden([([1, 2], SeqCache(0, [0]))], kv)
            tiny_fast.mtp_logits(X, torch.tensor([2, 3]), spans, kv)


def test_resuming_from_a_copied_slot_and_shared_pages_matches_a_full_pass(tiny_fast, tokens):
    """Prefix sharing as the engine does it: copy the slot state after 128 tokens (one whole page),
    continue two different suffixes from it, each with its own later pages."""
    cfg = tiny_fast.cfg
    kv = KVCache(cfg, 5, 3)
    prefix, (s1, s2) = tokens[:128], (tokens[128:170], tokens[200:242])
    tiny_fast([(prefix, SeqCache(0, [3]))], kv)
    for dst in (1, 2):
        for lc in kv.layers.values():
            lc.window[dst] = lc.window[0]
            for st in (lc.comp, lc.index_comp):
                if st is not None:
                    st.kv[dst], st.score[dst] = st.kv[0], st.score[0]
    a, b = SeqCache(1, [3, 0], 128), SeqCache(2, [3, 4], 128)
    got_a, got_b = tiny_fast([(s1, a), (s2, b)], kv, all_logits=True)
    torch.testing.assert_close(got_a, tiny_fast.prefill_logits(torch.cat([prefix, s1]))[128:], **TOL)
    torch.testing.assert_close(got_b, tiny_fast.prefill_logits(torch.cat([prefix, s2]))[128:], **TOL)
