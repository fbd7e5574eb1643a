"""Decode steps through DecodeGraphs (batch padded to a bucket, static step metadata) give the eager
path's logits. On CUDA (scripts/gpu-check.sh) the steps are captured as CUDA graphs and replayed;
on the CPU the same padded static steps run eagerly, which checks the bucketing and padding."""

from dataclasses import replace

import pytest
import torch

from v4d.serving import sizing
from v4d.serving.config import get_preset
from v4d.serving.model.cache import KVCache, SeqCache
from v4d.serving.model.graphs import DecodeGraphs, bucket_for
from v4d.serving.model.model import Transformer, init_weights


def test_buckets():
    assert [bucket_for(n) for n in (1, 2, 3, 5, 64, 65, 256)] == [1, 2, 4, 8, 64, 128, 256]
    assert bucket_for(257) is None and bucket_for(3, (4, 16)) == 4


@pytest.mark.parametrize("fmt", ["fp32", "deployed"])
def test_graph_decode_equals_eager(device: torch.device, fmt: str):
    cfg = replace(get_preset("v4-tiny-fast"), num_hidden_layers=3, compress_ratios=(0, 4, 16, 0))
    model = init_weights(Transformer(cfg), seed=0).eval().to(device)
    lens, steps = [21, 6, 40], 6  # three sequences (bucket 4: one padding row); blocks close on the way
    ids = torch.randint(0, cfg.vocab_size, (3, 40 + steps), generator=torch.Generator().manual_seed(0))
    pages = sizing.pages_for(cfg, 40 + steps)
    out = {}
    for mode in ("eager", "graph"):
        kv = KVCache(cfg, 3 * pages + 1, 4, device=device, fmt=fmt)  # + a scratch page and slot
        seqs = [SeqCache(i, list(range(i * pages, (i + 1) * pages))) for i in range(3)]
        graphs = DecodeGraphs(model, kv, max_pages=pages, scratch_slot=3, scratch_page=3 * pages)
        model([(ids[i, : lens[i]], s) for i, s in enumerate(seqs)], kv)
        logits = []
        for _ in range(steps):
            batch = [(ids[i, s.num_tokens : s.num_tokens + 1], s) for i, s in enumerate(seqs)]
            step = model(batch, kv) if mode == "eager" else graphs(batch)
            assert step is not None
            logits.append(torch.stack(step).cpu())
        out[mode] = torch.stack(logits)
        assert [s.num_tokens for s in seqs] == [n + steps for n in lens]
        if mode == "graph":
            assert bool(graphs.graphs) == (device.type == "cuda")
            # prefill chunks and batches past the largest bucket are not graph steps
            assert graphs([(ids[0, :2], SeqCache(0, [0]))]) is None
    torch.testing.assert_close(out["graph"], out["eager"], atol=2e-4, rtol=1e-4)
