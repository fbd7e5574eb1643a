"""The model gives the same logits with the Triton kernels as with the torch references.

A 3-layer v4-tiny-fast (SWA, CSA with indexer, HCA ratio 16, window 8; hash and score routing;
MTP block unused) runs a 29-token prefill then 4 decode steps; positions 29..32 include the
decode-time close of a CSA and an HCA block. On the CPU the Triton path is the interpreter.
"""

from dataclasses import replace

import pytest
import torch

from v4d.kernels import triton_backend
from v4d.serving import sizing
from v4d.serving.config import get_preset
from v4d.serving.model.cache import KVCache, SeqCache
from v4d.serving.model.model import Transformer, init_weights

OPS = ["paged_sparse_attention", "paged_indexer_scores", "indexer_topk", "gated_pool_indexed", "moe_experts",
       "hc_split_sinkhorn", "hc_pre", "hc_post"]


@torch.inference_mode()
def run(model: Transformer, ids: torch.Tensor, chunks: list[int], fmt: str) -> torch.Tensor:
    pages = sizing.pages_for(model.cfg, len(ids))
    kv = KVCache(model.cfg, pages, 1, device=model.embed.weight.device, fmt=fmt)
    seq = SeqCache(0, list(range(pages)))
    out, pos = [], 0
    for n in chunks:
        out.append(model([(ids[pos : pos + n], seq)], kv, all_logits=True)[0])
        pos += n
    return torch.cat(out).cpu()


@pytest.mark.parametrize("fmt", ["fp32", "deployed"])
def test_triton_path_logits_equal_reference_path(monkeypatch: pytest.MonkeyPatch, device: torch.device, fmt: str):
    cfg = replace(get_preset("v4-tiny-fast"), num_hidden_layers=3, compress_ratios=(0, 4, 16, 0))
    model = init_weights(Transformer(cfg), seed=0).eval().to(device)
    ids = torch.randint(0, cfg.vocab_size, (33,), generator=torch.Generator().manual_seed(0))
    chunks = [29, 1, 1, 1, 1]

    monkeypatch.setenv("V4D_KERNELS", "reference")
    want = run(model, ids, chunks, fmt)

    calls = dict.fromkeys(OPS, 0)
    for name in OPS:
        fn = getattr(triton_backend, name)

        def counted(*args, _fn=fn, _name=name):
            calls[_name] += 1
            return _fn(*args)

        monkeypatch.setattr(triton_backend, name, counted)
    monkeypatch.setenv("V4D_KERNELS", "triton")
    got = run(model, ids, chunks, fmt)

    assert all(calls.values()), f"ops never sent to Triton: {[k for k, v in calls.items() if not v]}"
    assert want.shape == (33, cfg.vocab_size) and torch.isfinite(want).all()
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
