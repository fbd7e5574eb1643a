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
from v4d.serving.model.opcount import OP_NAMES


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


def count_triton_calls(monkeypatch: pytest.MonkeyPatch, names) -> dict[str, int]:
    """Count the calls that reach each Triton launcher in `names` (they still run)."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        fn = getattr(triton_backend, name)

        def counted(*args, _fn=fn, _name=name):
            calls[_name] += 1
            return _fn(*args)

        monkeypatch.setattr(triton_backend, name, counted)
    return calls


@pytest.mark.parametrize("fmt", ["fp32", "deployed"])
def test_triton_path_logits_equal_reference_path(monkeypatch: pytest.MonkeyPatch, device: torch.device, fmt: str):
    cfg = replace(get_preset("v4-tiny-fast"), num_hidden_layers=3, compress_ratios=(0, 4, 16, 0))
    model = init_weights(Transformer(cfg), seed=0).eval().to(device)
    ids = torch.randint(0, cfg.vocab_size, (33,), generator=torch.Generator().manual_seed(0))
    chunks = [29, 1, 1, 1, 1]

    monkeypatch.setenv("V4D_KERNELS", "reference")
    want = run(model, ids, chunks, fmt)

    calls = count_triton_calls(monkeypatch, OP_NAMES)
    monkeypatch.setenv("V4D_KERNELS", "triton")
    got = run(model, ids, chunks, fmt)

    unused = {"fp32": {"pack_main", "pack_index"}, "deployed": set()}[fmt]  # plain stores take casts, not packing
    assert all(v for k, v in calls.items() if k not in unused), (
        f"ops never sent to Triton: {[k for k, v in calls.items() if not v and k not in unused]}"
    )
    assert want.shape == (33, cfg.vocab_size) and torch.isfinite(want).all()
    # Deployed: RoPE's cos/sin differ from torch's by an ulp here and there, which can flip one FP8
    # rounding of a cached entry (a 6% step of that value): a few logits move by ~5e-4.
    torch.testing.assert_close(got, want, atol=2e-4 if fmt == "fp32" else 1e-3, rtol=1e-4)


def deployed_copy(model: Transformer, device: torch.device) -> Transformer:
    """`model` in the deployed precision (FP8 projections, packed MXFP4 experts, bf16 elsewhere), the
    values quantised as a checkpoint writer would; built in-process (no tokenizer, no files)."""
    from v4d.kernels.quant import quant_fp4, quant_fp8
    from v4d.serving.model.build import build_model

    dep = build_model(model.cfg, "deployed")
    src = model.state_dict()
    with torch.no_grad():
        for name, p in dep.named_parameters():
            if name.endswith(".scale") and name.removesuffix(".scale") + ".weight" in src:
                continue
            value = src[name].float()
            if p.dtype in (torch.float8_e4m3fn, torch.int8):
                q, s = quant_fp8(value) if p.dtype == torch.float8_e4m3fn else quant_fp4(value)
                p.copy_(q)
                dep.get_parameter(name.removesuffix(".weight") + ".scale").copy_(s)
            else:
                p.copy_(value)
        for name, b in dep.named_buffers():
            b.copy_(model.get_buffer(name))
    return dep.to(device)


def test_deployed_precision_triton_path_equals_reference_path(monkeypatch: pytest.MonkeyPatch, device: torch.device):
    """FP8 GEMMs and the packed-MXFP4 grouped MoE inside the whole model, bf16 activations."""
    cfg = replace(get_preset("v4-tiny-fast"), num_hidden_layers=3, compress_ratios=(0, 4, 16, 0))
    model = deployed_copy(init_weights(Transformer(cfg), seed=0).eval(), device)
    assert model.layers[1].attn.wq_b.weight.dtype == torch.float8_e4m3fn
    ids = torch.randint(0, cfg.vocab_size, (33,), generator=torch.Generator().manual_seed(0))
    chunks = [29, 1, 1, 1, 1]
    monkeypatch.setenv("V4D_KERNELS", "reference")
    want = run(model, ids, chunks, "deployed").float()
    calls = count_triton_calls(monkeypatch, ("fp8_linear", "moe_experts"))
    monkeypatch.setenv("V4D_KERNELS", "triton")
    got = run(model, ids, chunks, "deployed").float()
    assert all(calls.values()), calls
    assert torch.isfinite(want).all()
    # bf16 activations: the paths round differently and a random model amplifies it. Swapping any one
    # kernel alone (paged_sparse_attention, moe_experts or fp8_linear) moves the logits by a median 4-5%
    # (max 0.17-0.35) relative to their norm; a wrong scale or nibble would move them by ~100%.
    err = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert err.median() < 0.1 and err.max() < 0.5, err
