"""Batched paged decode: mixed steps are exact, work per layer does not grow with the batch, and the
step metadata addresses rings and pages as documented (serving/model/step.py)."""

from __future__ import annotations

from functools import partial

import torch
from helpers.models import build

from v4d.serving import sizing
from v4d.serving.model.cache import KVCache, SeqCache
from v4d.serving.model.opcount import LAUNCH_BUDGET, decode_step_launches, ops_per_layer
from v4d.serving.model.step import Step

from .test_model_equivalence import TOL

# Estimated CUDA kernels of the busiest (CSA) layer per decode step, reached so far (v4-tiny-fast dims,
# bf16, batch 1 and 64; docs/kernels.md has the figures before and after each cut). Issue 11's target
# is LAUNCH_BUDGET (40), reached; lower this as launches are cut, never raise it to pass.
EST_LAUNCHES_REACHED = 36


def test_mixed_steps_of_prefill_chunks_and_decodes_equal_each_sequence_alone(tiny_fast, tokens):
    """Three sequences advance together for 12 steps, each step mixing prefill chunks of several
    sizes with single-token decodes; every logit equals the sequence's one-pass prefill (fp32)."""
    cfg = tiny_fast.cfg
    plans = [
        [20, 13, 1, 1, 9, 1, 1, 1, 1, 1, 1, 1],
        [1] * 4 + [30, 17] + [1] * 6,
        [40, 1, 1, 1, 1, 5, 1, 1, 1, 1, 1, 1],
    ]
    seqs_ids = [tokens[i * 100 : i * 100 + sum(p)] for i, p in enumerate(plans)]
    kv = KVCache(cfg, 8, 5)
    seqs = [SeqCache(slot=4 - i, page_ids=[7 - i, 2 + i]) for i in range(3)]
    got: list[list[torch.Tensor]] = [[], [], []]
    for step in range(12):
        batch = [
            (ids[s.num_tokens : s.num_tokens + p[step]], s) for ids, s, p in zip(seqs_ids, seqs, plans, strict=True)
        ]
        for i, out in enumerate(tiny_fast(batch, kv, all_logits=True)):
            got[i].append(out)
    for ids, parts in zip(seqs_ids, got, strict=True):
        torch.testing.assert_close(torch.cat(parts), tiny_fast.prefill_logits(ids), **TOL)


def test_ops_per_layer_of_a_decode_step_do_not_grow_with_the_batch(tiny_fast):
    cfg, ctx = tiny_fast.cfg, 45
    counts = {}
    for b in (1, 64):
        pages = sizing.pages_for(cfg, ctx + 1)
        kv = KVCache(cfg, b * pages, b, fmt="deployed")
        seqs = [SeqCache(i, list(range(i * pages, (i + 1) * pages))) for i in range(b)]
        ids = torch.randint(0, cfg.vocab_size, (b, ctx + 1), generator=torch.Generator().manual_seed(b))
        tiny_fast([(ids[i, :ctx], seqs[i]) for i in range(b)], kv)
        with torch.inference_mode():
            counts[b] = ops_per_layer(tiny_fast, partial(tiny_fast, [(ids[i, ctx:], seqs[i]) for i in range(b)], kv))
    for kind in (0, 1):  # all ops, ops that may launch work
        assert set(counts[1][kind]) == set(range(cfg.num_hidden_layers))
        for layer, n in counts[1][kind].items():
            got = counts[64][kind][layer]
            assert got <= 1.1 * n, f"layer {layer}: {got} ops at batch 64 vs {n} at batch 1"
    assert all(counts[1][1][layer] < n for layer, n in counts[1][0].items())
    # issue 11's target: at most LAUNCH_BUDGET launches per layer per decode step, on the busiest
    # (CSA) layer too, at batch 1 and 64
    for b in (1, 64):
        busiest = max(counts[b][1].values())
        assert busiest == counts[b][1][cfg.compress_ratios.index(4)], "a CSA layer is the busiest"
        assert busiest <= LAUNCH_BUDGET, f"batch {b}: {busiest} launching ops on the busiest layer"


def test_step_indices_address_fresh_rows_rings_and_pages(tiny_fast):
    cfg = tiny_fast.cfg  # window 8, ratios 4 / 16, 128-token pages
    step = Step.build(cfg, [(10, 3, 2, [5, 1]), (130, 1, 0, [3, 6])], num_slots=4, device="cpu")
    n, w = 4, cfg.sliding_window
    assert step.pos.tolist() == [10, 11, 12, 130] and step.seq.tolist() == [0, 0, 0, 1]
    # row 0 (position 10) sees 3..10: 3..9 from slot 2's ring, 10 is fresh row 0
    assert step.window_idx[0].tolist() == [n + 2 * w + p % w for p in range(3, 10)] + [0]
    assert step.window_idx[2, -3:].tolist() == [0, 1, 2]
    # the ring keeps the last 8 positions of each chunk: all 3 of the first, the decode of the second
    assert step.ring_src.tolist() == [0, 1, 2, 3]
    assert step.ring_dst.tolist() == [2 * w + 10 % w, 2 * w + 11 % w, 2 * w + 12 % w, 0 * w + 130 % w]
    csa = step.compression(4)
    # position 11 closes CSA entry 2 (tokens 8..11 + previous block 4..7); 130 closes nothing
    assert csa.anchor.tolist() == [8] and csa.visible.tolist() == [2, 3, 3, 32]
    assert csa.idx[0].tolist() == [n + 2 * 8 + p % 8 for p in range(4, 10)] + [0, 1]
    assert csa.entry_rows.tolist() == [5 * 32 + 2]  # page 5 (the sequence's first), offset 2
    # entry 31 of sequence 1 (position 127) is on its first page 3; entry 32 on its second page 6
    assert step.store_rows(torch.tensor([1, 1]), torch.tensor([31, 32]), 32).tolist() == [3 * 32 + 31, 6 * 32]
    hca = step.compression(16)
    # HCA attends to the window, then every visible entry: page-store rows past the step's rows and rings
    assert hca.max_visible == 8 and hca.attn_idx.shape == (n, w + 8)
    assert torch.equal(hca.attn_idx[:, :w], step.window_idx)
    assert hca.attn_idx[3, w:].tolist() == [step.entry_offset + 3 * 8 + s for s in range(8)]
    assert step.entry_offset == n + 4 * w


def test_estimated_cuda_launches_of_the_busiest_layer_stay_within_reach_and_flat_in_batch():
    """`decode_step_launches` (Triton in the interpreter with an H200's launch decisions, aten ops
    with their CUDA kernel counts) of a bf16 SWA / CSA / HCA model, as deployed (its upcasts count)."""
    model = build("v4-tiny-fast", num_hidden_layers=3, compress_ratios=(0, 4, 16, 0)).to(torch.bfloat16)
    est = {b: decode_step_launches(model, b) for b in (1, 64)}
    for b, e in est.items():
        busiest = max(e.per_layer.values())
        assert e.per_layer[1] == busiest, f"batch {b}: the CSA layer is the busiest ({e.per_layer})"
        assert busiest <= EST_LAUNCHES_REACHED, f"batch {b}: {busiest} launches on the CSA layer ({e.by_kernel[1]})"
        assert e.graph_replay == 3 and e.total > sum(e.per_layer.values())
    assert est[64].per_layer[1] <= 1.1 * est[1].per_layer[1], {b: e.per_layer for b, e in est.items()}
