"""Router, experts, mHC, RoPE and parameter names of the model, part by part."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from v4d.kernels import ops
from v4d.kernels.quant import quant_fp8
from v4d.serving import sizing
from v4d.serving.config import get_preset
from v4d.serving.model import model as model_mod
from v4d.serving.model.concat import RowConcat
from v4d.serving.model.linear import Linear, weights_in
from v4d.serving.model.mhc import hc_pre
from v4d.serving.model.model import Transformer, head_logits
from v4d.serving.model.moe import LocalExperts
from v4d.serving.model.rope import Rope, inv_freq


def test_hash_routing_is_a_pure_function_of_the_token_id(tiny):
    gate = tiny.layers[0].ffn.gate
    assert gate.hash and gate.bias is None and not tiny.layers[2].ffn.gate.hash
    ids = torch.tensor([5, 9, 5, 700, 9])
    x = torch.randn(5, tiny.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    weights, chosen = gate(x, ids)
    assert torch.equal(chosen, gate.tid2eid[ids].long())
    assert torch.equal(chosen[0], chosen[2]) and torch.equal(chosen[1], chosen[4])  # different hidden states
    # the weights still come from the gate's scores at the table's experts
    scores = F.softplus(x @ gate.weight.T).sqrt().gather(1, chosen)
    torch.testing.assert_close(weights, scores / scores.sum(-1, keepdim=True) * tiny.cfg.routed_scaling_factor)


def test_bias_changes_the_choice_but_not_the_weights(tiny):
    gate = tiny.layers[2].ffn.gate
    x = torch.randn(64, tiny.cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    ids = torch.zeros(64, dtype=torch.long)
    _, before = gate(x, ids)
    saved = gate.bias.detach().clone()
    try:
        with torch.no_grad():
            gate.bias.zero_()
            gate.bias[[3, 11]] = 100.0  # forces experts 3 and 11
        weights, after = gate(x, ids)
    finally:
        with torch.no_grad():
            gate.bias.copy_(saved)
    assert not torch.equal(before, after)
    assert set(after.flatten().tolist()) == {3, 11}
    scores = F.softplus(x @ gate.weight.T).sqrt()[:, [3, 11]]  # unbiased scores
    torch.testing.assert_close(weights.sum(-1), torch.full((64,), 1.5))
    torch.testing.assert_close(weights, scores.gather(1, (after == 11).long()) / scores.sum(-1, keepdim=True) * 1.5)


def test_local_experts_match_a_per_expert_loop_and_follow_loaded_weights(tiny):
    moe = tiny.layers[2].ffn
    backend = LocalExperts({2: moe})
    x = torch.randn(20, tiny.cfg.hidden_size, generator=torch.Generator().manual_seed(2)) * 30
    ids = torch.randint(0, 16, (20, 2), generator=torch.Generator().manual_seed(3))
    w = torch.rand(20, 2, generator=torch.Generator().manual_seed(4))
    lim = tiny.cfg.swiglu_limit
    expect = torch.zeros_like(x)
    for t in range(20):
        for j in range(2):
            e = moe.experts[int(ids[t, j])]
            h = F.silu(e.w1(x[t]).clamp(max=lim)) * e.w3(x[t]).clamp(-lim, lim)
            expect[t] += w[t, j] * e.w2(h)
    # fp32 sums in another order (the dense path adds every local expert, unrouted ones with weight
    # 0): absolute error scales with the outputs' size, so atol does too
    tol = {"atol": 1e-5 * float(expect.abs().max()), "rtol": 1e-4}
    torch.testing.assert_close(backend(2, x, ids, w), expect, **tol)
    # parameters stay the stacked tensor's slices: an in-place load is seen without restacking
    state = {k: v.clone() * 2 for k, v in moe.state_dict().items() if ".w2." in k}
    old = {k: v.clone() for k, v in moe.state_dict().items() if ".w2." in k}
    moe.load_state_dict(state, strict=False)
    try:
        torch.testing.assert_close(backend(2, x, ids, w), 2 * expect, atol=2 * tol["atol"], rtol=1e-4)
    finally:
        moe.load_state_dict(old, strict=False)


def test_sinkhorn_mixing_is_doubly_stochastic(tiny):
    block = tiny.layers[1]
    X = torch.randn(32, 4, tiny.cfg.hidden_size, generator=torch.Generator().manual_seed(4)) * 3
    fn, scale, base = block.hc_attn_fn, block.hc_attn_scale, block.hc_attn_base
    x, post, comb = hc_pre(X, fn, scale, base, 20, 1e-6, 1e-6, block.attn_norm)
    assert x.shape == (32, tiny.cfg.hidden_size) and post.shape == (32, 4)
    torch.testing.assert_close(comb.sum(-2), torch.ones(32, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(comb.sum(-1), torch.ones(32, 4), atol=1e-3, rtol=0)
    assert (comb > 0).all() and ((post > 0) & (post < 2)).all()


def test_rope_is_interleaved_relative_and_invertible():
    rope = Rope(8, inv_freq(8, 10000.0))
    x = torch.randn(5, 3, 12, generator=torch.Generator().manual_seed(5))
    pos = torch.tensor([0, 1, 7, 100, 5000])
    y = rope(x, pos)
    assert torch.equal(y[..., :4], x[..., :4])  # only the last 8 dims rotate
    torch.testing.assert_close(rope(y, pos, inverse=True), x, atol=1e-5, rtol=1e-5)
    # pair (0, 1) of the rotated part turns by angle pos * 1
    a = torch.tensor(7.0)
    expect = torch.stack([x[2, 0, 4] * a.cos() - x[2, 0, 5] * a.sin(), x[2, 0, 4] * a.sin() + x[2, 0, 5] * a.cos()])
    torch.testing.assert_close(y[2, 0, 4:6], expect)
    # q . k depends only on the offset
    q, k = torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(6))
    dots = [(rope(q, torch.tensor([p + 3])) * rope(k, torch.tensor([p]))).sum() for p in (0, 40, 900)]
    torch.testing.assert_close(torch.stack(dots), dots[0].expand(3), atol=1e-4, rtol=1e-4)


def test_yarn_on_compressed_layers_plain_rope_on_swa_layers(tiny):
    cfg = tiny.cfg
    plain = inv_freq(16, cfg.rope_theta)
    torch.testing.assert_close(tiny.layers[0].attn.rope.inv_freq, plain)
    yarn = tiny.layers[2].attn.rope.inv_freq
    raw = inv_freq(16, cfg.compress_rope_theta)
    assert tiny.layers[2].attn.compressor.rope is tiny.layers[2].attn.rope  # compressed keys share it
    torch.testing.assert_close(yarn[0], raw[0])  # fastest pair untouched
    torch.testing.assert_close(yarn[-1], raw[-1] / cfg.rope_scaling.factor)  # slowest pair interpolated
    assert not math.isclose(float(yarn[-1]), float(raw[-1]))


def test_state_dict_uses_the_official_names_and_shapes(tiny):
    cfg = tiny.cfg
    got = {k: tuple(v.shape) for k, v in tiny.state_dict().items()}
    want = {}
    for t in sizing.model_tensors(cfg, mtp=True):
        # the inventory lists the MTP block under layers.{L}; the module keeps the official mtp.0.
        name = t.name.replace(f"layers.{cfg.num_hidden_layers}.", "mtp.0.")
        for e in range(cfg.n_routed_experts if "*" in name else 1):
            want[name.replace("*", str(e))] = t.shape
    assert got == want
    assert tiny.state_dict()["layers.0.ffn.gate.tid2eid"].dtype == torch.int32


def test_without_experts_the_model_holds_no_routed_weights():
    bare = Transformer(get_preset("v4-tiny-fast"), with_experts=False)
    assert not any(".ffn.experts." in k for k in bare.state_dict())
    assert any(".ffn.shared_experts." in k for k in bare.state_dict())


def test_shared_expert_is_clamped_like_the_routed_ones(tiny):
    moe = tiny.layers[2].ffn
    s, lim = moe.shared_experts, tiny.cfg.swiglu_limit
    x = torch.randn(16, tiny.cfg.hidden_size, generator=torch.Generator().manual_seed(4)) * 40
    gate, up = s.w1(x), s.w3(x)
    assert (gate > lim).any() and (up.abs() > lim).any()  # the inputs reach past the limit both ways
    expect = s.w2(F.silu(gate.clamp(max=lim)) * up.clamp(-lim, lim))
    no_routed = lambda layer, x, ids, w: torch.zeros_like(x)  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(moe(x, torch.zeros(16, dtype=torch.long), no_routed), expect, atol=1e-4, rtol=1e-4)


def test_head_logits_upcast_in_chunks_equal_one_full_upcast(monkeypatch):
    """A bf16 head gives the fp32 logits of one full upcast, chunk by chunk (a ragged last chunk too);
    an fp32 head is used as is."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g)
    w = torch.randn(1000, 64, generator=g).to(torch.bfloat16)
    monkeypatch.setattr(model_mod, "HEAD_CHUNK_ROWS", 96)
    got = head_logits(x.to(torch.bfloat16), w)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, F.linear(x.to(torch.bfloat16).float(), w.float()), rtol=1e-6, atol=1e-5)
    w32 = w.float()
    torch.testing.assert_close(head_logits(x, w32), F.linear(x, w32), rtol=0, atol=0)


def test_row_concat_runs_joinable_layers_as_one_gemm_under_their_names():
    """FP8 layers of whole 128-row blocks join weight and scale rows (one fp8_linear); a plain layer
    after them runs on its own; an unaligned FP8 layer too. Outputs equal the layers' own; the
    parameters stay where load_state_dict copies into them."""
    gen = torch.Generator().manual_seed(0)
    with weights_in("deployed"):
        a, b, odd = Linear(256, 128, "fp8"), Linear(256, 256, "fp8"), Linear(256, 64, "fp8")
    plain = torch.nn.Linear(256, 8, bias=False)
    for lin in (a, b, odd):
        w, s = quant_fp8(torch.randn(lin.out_features, 256, generator=gen))
        lin.weight.data, lin.scale.data = w, s
    x = torch.randn(3, 256, generator=gen)
    want = [lin(x) for lin in (a, b, plain, odd)]
    cat = RowConcat(a, b, plain, odd)
    assert [len(run.layers) for run in cat.runs] == [2, 1, 1]
    got = cat(x)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert b.weight.data_ptr() == a.weight.data_ptr() + 128 * 256 and b.scale.data_ptr() == a.scale.data_ptr() + 2
    fresh, _ = quant_fp8(torch.randn(256, 256, generator=gen))
    b.load_state_dict({"weight": fresh, "scale": b.scale.detach().clone()})
    torch.testing.assert_close(cat(x)[1], ops.fp8_linear(x, fresh, b.scale), atol=1e-5, rtol=1e-5)
