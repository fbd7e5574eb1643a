"""KV cache layout and byte accounting: exact sizes, agreement with the size math, page ownership."""

from __future__ import annotations

import pytest
import torch

from v4d.serving.config import get_preset
from v4d.serving.model.cache import KVCache, SeqCache
from v4d.serving.sizing import page_bytes, slot_bytes


@pytest.mark.parametrize("dtype,fmt", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
def test_allocated_tensors_are_exactly_the_accounted_bytes(dtype, fmt):
    cfg = get_preset("v4-tiny")
    kv = KVCache(cfg, num_pages=3, num_slots=2, dtype=dtype)
    assert kv.page_nbytes == page_bytes(cfg, fmt)
    assert kv.slot_nbytes == slot_bytes(cfg, fmt)
    total = sum(t.nbytes for lc in kv.layers.values() for t in (lc.window, lc.main, lc.index) if t is not None)
    total += sum(s.kv.nbytes + s.score.nbytes for lc in kv.layers.values() for s in (lc.comp, lc.index_comp) if s)
    assert total == 3 * page_bytes(cfg, fmt) + 2 * slot_bytes(cfg, fmt)
    # a page is 128 positions: 32 CSA entries + 32 indexer keys, 1 HCA entry
    assert kv.layer(2).main.shape[1:] == (32, cfg.head_dim) and kv.layer(2).index.shape[1:] == (32, 32)
    assert kv.layer(3).main.shape[1:] == (1, cfg.head_dim) and kv.layer(0).main is None
    mtp = KVCache(cfg, 3, 2, dtype=dtype, with_mtp=True)
    assert (
        mtp.slot_nbytes == slot_bytes(cfg, fmt, with_mtp=True) == kv.slot_nbytes + 128 * cfg.head_dim * dtype.itemsize
    )


def test_a_sequence_writes_only_its_own_pages_and_slot(tiny, tokens):
    cfg = tiny.cfg
    kv = KVCache(cfg, num_pages=6, num_slots=3)
    seq = SeqCache(slot=1, page_ids=[4, 1, 5])
    tiny([(tokens[:300], seq)], kv)
    assert seq.num_tokens == 300
    for layer, lc in kv.layers.items():
        assert not lc.window[[0, 2]].any() and lc.window[1].any()
        if lc.main is not None:
            assert not lc.main[[0, 2, 3]].any()
            per_page = lc.main.shape[1]
            n = 300 // cfg.compress_ratios[layer]
            for k, page in enumerate(seq.page_ids):  # closed entries only, in the sequence's page order
                assert lc.main[page].abs().sum(-1).gt(0).sum() == min(max(n - k * per_page, 0), per_page)
