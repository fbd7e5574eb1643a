"""Hybrid attention against a dense-mask reference written from the weights, token by token."""

from __future__ import annotations

import pytest
import torch
from helpers.models import build

from v4d.serving import sizing
from v4d.serving.model.cache import KVCache
from v4d.serving.model.step import Step


def compress_ref(comp, x: torch.Tensor) -> torch.Tensor:
    """Entries of every closed block, one at a time: softmax over the block's candidates per channel."""
    m, c, T = comp.ratio, comp.head_dim, x.shape[0]
    kv = comp.wkv(x.float())
    gate = comp.wgate(x.float()) + comp.ape[torch.arange(T) % m]
    out = []
    for i in range(T // m):
        cur = slice(i * m, (i + 1) * m)
        if comp.overlap:
            prev = slice((i - 1) * m, i * m)
            v = torch.cat([kv[prev, :c], kv[cur, c:]]) if i else kv[cur, c:]
            g = torch.cat([gate[prev, :c], gate[cur, c:]]) if i else gate[cur, c:]
        else:
            v, g = kv[cur], gate[cur]
        e = comp.norm((torch.softmax(g, dim=0) * v).sum(0))
        out.append(comp.rope(e[None], torch.tensor([i * m]))[0])
    return torch.stack(out) if out else kv.new_zeros(0, c)


def indexer_topk_ref(attn, x: torch.Tensor, k: int) -> torch.Tensor:
    """allowed[t, s]: s among the k best indexer scores of t (ties to the lowest index)."""
    ix, T = attn.indexer, x.shape[0]
    qr = attn.q_norm(attn.wq_a(x))
    q = ix.rope(ix.wq_b(qr).view(T, ix.n_heads, ix.head_dim), torch.arange(T))
    keys = compress_ref(ix.compressor, x)
    w = ix.weights_proj(x) * (ix.head_dim * ix.n_heads) ** -0.5
    allowed = torch.zeros(T, keys.shape[0], dtype=torch.bool)
    for t in range(T):
        n = (t + 1) // ix.compressor.ratio
        scores = [float((w[t] * torch.relu(q[t] @ keys[s])).sum()) for s in range(n)]
        best = sorted(range(n), key=lambda s: (-scores[s], s))[:k]
        allowed[t, best] = True
    return allowed


def dense_ref(attn, x: torch.Tensor, window: int, compressed: str) -> torch.Tensor:
    """One softmax (with sink) per query over a boolean mask of window rows + compressed rows.
    compressed: "none" (window only), "all" (every closed block) or "topk" (indexer choice)."""
    T, H, D = x.shape[0], attn.n_heads, attn.head_dim
    pos = torch.arange(T)
    q = attn.wq_b(attn.q_norm(attn.wq_a(x))).view(T, H, D)
    q = attn.rope(q / q.pow(2).mean(-1, keepdim=True).add(attn.eps).sqrt(), pos)
    kv = attn.rope(attn.kv_norm(attn.wkv(x)), pos)
    entries = compress_ref(attn.compressor, x) if attn.ratio else kv.new_zeros(0, D)
    keys = torch.cat([kv, entries])
    t, j = pos[:, None], pos[None, :]
    win = (j <= t) & (j > t - window)
    s = torch.arange(entries.shape[0])[None, :]
    closed = (s + 1) * max(attn.ratio, 1) - 1 <= t
    if compressed == "none":
        closed = torch.zeros_like(closed)
    elif compressed == "topk":
        closed = closed & indexer_topk_ref(attn, x, attn.indexer.topk)
    mask = torch.cat([win, closed], dim=1)
    z = torch.einsum("thd,jd->thj", q, keys) * D**-0.5
    z = z.masked_fill(~mask[:, None, :], float("-inf"))
    z = torch.cat([z, attn.attn_sink.view(1, H, 1).expand(T, H, 1)], dim=-1)
    o = torch.einsum("thj,jd->thd", torch.softmax(z, dim=-1)[..., :-1], keys)
    o = attn.rope(o, pos, inverse=True).view(T, attn.groups, -1)
    o = torch.einsum("tgc,grc->tgr", o, attn.wo_a.weight.view(attn.groups, attn.o_lora_rank, -1))
    return attn.wo_b(o.flatten(1))


def run_layer(model, layer: int, x: torch.Tensor) -> torch.Tensor:
    cfg, T = model.cfg, x.shape[0]
    pages = sizing.pages_for(cfg, T)
    kv = KVCache(cfg, pages, 1)
    step = Step.build(cfg, [(0, T, 0, list(range(pages)))], kv.num_slots, "cpu")
    return model.layers[layer].attn(x, step, kv.layer(layer))


@pytest.fixture(scope="module")
def wide_topk():
    return build("v4-tiny-fast", seed=3, index_topk=64)


@torch.inference_mode()
def test_csa_with_topk_beyond_visible_blocks_equals_dense_mask(wide_topk):
    x = torch.randn(100, wide_topk.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    assert wide_topk.cfg.layer_kind(2) == "csa" and 100 // 4 < wide_topk.cfg.index_topk
    got = run_layer(wide_topk, 2, x)
    torch.testing.assert_close(got, dense_ref(wide_topk.layers[2].attn, x, 8, "all"), atol=1e-5, rtol=1e-4)


@torch.inference_mode()
def test_csa_top_k_follows_the_indexer(tiny_fast):
    x = torch.randn(60, tiny_fast.cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    attn = tiny_fast.layers[2].attn
    got = run_layer(tiny_fast, 2, x)
    torch.testing.assert_close(got, dense_ref(attn, x, 8, "topk"), atol=1e-5, rtol=1e-4)
    # with k = 4 of up to 15 visible blocks the selection matters
    assert not torch.allclose(got[40:], dense_ref(attn, x, 8, "all")[40:], atol=1e-3)


@torch.inference_mode()
def test_hca_query_sees_only_the_window_until_its_first_block_closes(tiny):
    attn = tiny.layers[3].attn
    assert tiny.cfg.layer_kind(3) == "hca" and attn.ratio == 128
    x = torch.randn(200, tiny.cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    got = run_layer(tiny, 3, x)
    window_only = dense_ref(attn, x, 128, "none")
    torch.testing.assert_close(got[:127], window_only[:127], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got, dense_ref(attn, x, 128, "all"), atol=1e-5, rtol=1e-4)
    # from position 127 on (the block 0..127 closed) the compressed entry takes part
    assert not torch.allclose(got[127:], window_only[127:], atol=1e-4)


@torch.inference_mode()
def test_swa_layer_is_window_attention_with_plain_rope(tiny):
    attn = tiny.layers[0].attn
    assert attn.compressor is None and attn.indexer is None
    x = torch.randn(150, tiny.cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(run_layer(tiny, 0, x), dense_ref(attn, x, 128, "none"), atol=1e-5, rtol=1e-4)
