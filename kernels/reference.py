"""Plain torch references for every op in `v4d.kernels.ops`: these define the semantics.

All math is done in fp32; results are cast back to the input's dtype (indexer scores and the mHC
split stay fp32). Shapes follow docs/contracts.md ("Kernels"). Written for readability, not speed:
they run the model on CPU and on accelerators without a Triton backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from v4d.kernels import kv_format
from v4d.kernels.kv_format import load_rows
from v4d.kernels.quant import act_quant as quantise_activations
from v4d.kernels.quant import dequant_fp4, dequant_fp8
from v4d.kernels.rownorm import RowNorm

QUERY_BLOCK = 512  # query rows per gather in paged_sparse_attention (a decode batch is one block)


def sparse_attention(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float
) -> torch.Tensor:
    """o[t,h] = sum_j p[t,h,j] kv[idx[t,j]], p = exp(z) / (sum exp(z) + exp(sink[h])).

    z[t,h,j] = scale * q[t,h] . kv[idx[t,j]]; entries with idx == -1 are left out. Keys are the
    values (shared K=V). A row whose indices are all -1 returns zeros.
    """
    valid = idx >= 0  # [T,K]
    rows = kv.float()[idx.clamp(min=0).long()]  # [T,K,D]
    return _attend(q, rows, valid, sink, scale)


def _attend(q: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor, sink: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax with sink of q[T,H,D] over its gathered rows[T,K,D] where valid[T,K]."""
    z = torch.einsum("thd,tkd->thk", q.float(), rows) * scale
    z = z.masked_fill(~valid[:, None, :], float("-inf"))
    sink_z = sink.float()[None, :, None].expand(z.shape[0], -1, 1)
    # The sink is one more logit in the softmax whose value is dropped afterwards.
    p = torch.softmax(torch.cat([z, sink_z], dim=-1), dim=-1)[..., :-1]
    o = torch.einsum("thk,tkd->thd", p, rows)
    return o.to(q.dtype)


def paged_sparse_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    ring: torch.Tensor,
    store: torch.Tensor | None,
    idx: torch.Tensor,
    sink: torch.Tensor,
    scale: float,
    rope_dim: int,
    unrotate: tuple[torch.Tensor, torch.Tensor] | None = None,
    q_norm: RowNorm | None = None,
) -> torch.Tensor:
    """`sparse_attention` over three row sources addressed by one index space, without copying them:
    j < N is kv[j] (this step's fresh window entries), N <= j < N + R is ring[j - N] (the window
    rings, flattened), beyond that store[j - N - R] (the compressed pages, flattened). All three hold
    rows in one format, plain floats or packed deployed entries (kv_format), decoded as gathered.
    unrotate = (pos, inv_freq): then the output's inverse `rope`; q_norm: of the queries' `rms_norm`."""
    o = _paged_attention(_normed(q, q_norm), kv, ring, store, idx, sink, scale, rope_dim)
    return o if unrotate is None else rope(o, *unrotate, inverse=True)


def _paged_attention(q, kv, ring, store, idx, sink, scale, rope_dim) -> torch.Tensor:
    if q.shape[0] > QUERY_BLOCK:  # long prefill chunks: bound the gathered [T, K, D] rows
        return torch.cat(
            [
                _paged_attention(
                    q[lo : lo + QUERY_BLOCK], kv, ring, store, idx[lo : lo + QUERY_BLOCK], sink, scale, rope_dim
                )
                for lo in range(0, q.shape[0], QUERY_BLOCK)
            ]
        )
    n, r, d = kv.shape[0], ring.shape[0], q.shape[-1]
    i = idx.long()
    valid = i >= 0
    rows = q.new_zeros(*i.shape, d, dtype=torch.float32)
    fresh, in_ring = valid & (i < n), (i >= n) & (i < n + r)
    rows[fresh] = load_rows(kv, d, rope_dim)[i[fresh]]  # the step's own rows: decoded once, then gathered
    rows[in_ring] = load_rows(ring[i[in_ring] - n], d, rope_dim)
    if store is not None:
        in_store = i >= n + r
        rows[in_store] = load_rows(store[i[in_store] - n - r], d, rope_dim)
    return _attend(q, rows, valid, sink, scale)


def indexer_scores(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, n_visible: torch.Tensor) -> torch.Tensor:
    """scores[t,s] = sum_h w[t,h] * relu(q[t,h] . k[s]), -inf where s >= n_visible[t] (fp32)."""
    s = torch.relu(torch.einsum("thd,sd->ths", q.float(), k.float()))
    scores = torch.einsum("ths,th->ts", s, w.float())
    hidden = torch.arange(k.shape[0], device=k.device)[None, :] >= n_visible.to(k.device)[:, None]
    return scores.masked_fill(hidden, float("-inf"))


def indexer_topk(
    scores: torch.Tensor,
    k: int,
    rows: tuple[torch.Tensor, torch.Tensor, int, int] | None = None,
    prefix: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices of the k largest finite scores per row (int32), -1 in the slots left over; with `rows`
    = (block_table, seq, E, offset) each chosen s becomes offset + block_table[seq[t], s // E] * E + s % E,
    after the columns of `prefix` (see ops.indexer_topk).

    Ties at the k-th score go to the lowest index, so the choice does not depend on the masked
    columns after it. `topk` (O(S), unspecified tie order) picks the candidates; rows where it left
    out an index tied with the k-th score select again with the later ties masked (no full sort). Order:
    descending score, ties by ascending index (sorting k entries); callers treat the selection as
    a set (the Triton kernel returns ascending indices).
    """
    idx = _topk(scores, k)
    if rows is not None:
        table, seq, per_page, offset = rows
        s = idx.long()
        page = table[seq[:, None], (s // per_page).clamp(0, table.shape[1] - 1)]
        idx = torch.where(s >= 0, offset + page * per_page + s % per_page, -1).to(torch.int32)
    return idx if prefix is None else torch.cat([prefix.to(torch.int32), idx], dim=1)


def _topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    t, s = scores.shape
    idx = torch.full((t, k), -1, dtype=torch.int32, device=scores.device)
    kk = min(k, s)
    if kk == 0:
        return idx
    scores = scores.float()
    vals, order = torch.topk(scores, kk, dim=-1)
    kth = vals[:, -1:]
    tied_out = ((scores == kth).sum(-1) > (vals == kth).sum(-1)) & torch.isfinite(kth[:, 0])
    if bool(tied_out.any()):  # keep the lowest-index ties: drop the later ones, select again
        rows = tied_out.nonzero().squeeze(1)
        sr, kr = scores[rows], kth[rows]
        eq = sr == kr
        need = kk - (sr > kr).sum(-1, keepdim=True)
        vals[rows], order[rows] = torch.topk(sr.masked_fill(eq & (eq.cumsum(-1) > need), float("-inf")), kk, dim=-1)
    order, pos = torch.sort(order, dim=-1)  # ascending index, then a stable sort by score
    vals = vals.gather(1, pos)
    vals, pos = torch.sort(vals, dim=-1, descending=True, stable=True)
    order = order.gather(1, pos)
    idx[:, :kk] = torch.where(torch.isfinite(vals), order, -1).to(torch.int32)
    return idx


def gated_pool(values: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """out[b,c] = sum_l softmax_l(gates[b,:,c]) * values[b,l,c].

    A gate of -inf is a padded slot (weight 0); a channel whose gates are all -inf pools to 0.
    """
    g = gates.float()
    m = g.amax(dim=1, keepdim=True)
    e = torch.exp(g - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    den = e.sum(dim=1)
    num = (e * values.float()).sum(dim=1)
    out = torch.where(den > 0, num / den.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(num))
    return out.to(values.dtype)


def paged_indexer_scores(
    q: torch.Tensor,
    w: torch.Tensor,
    keys: torch.Tensor,
    block_table: torch.Tensor,
    seq: torch.Tensor,
    n_visible: torch.Tensor,
    w_scale: float = 1.0,
) -> torch.Tensor:
    """`indexer_scores` (head weights w * w_scale) of each query row against its own sequence's keys,
    read from pages.

    keys [num_pages, E, *] (plain rows or packed FP4 keys), block_table [B, P] page ids (-1 unused),
    seq [T] the row's sequence; column s of the result is entry s of that sequence (page s // E,
    offset s % E): [T, P * E] fp32, -inf where s >= n_visible[t].
    """
    t, h, d = q.shape
    nb = block_table.shape[0]
    k = load_rows(keys[block_table.clamp(min=0).long()], d, None).flatten(1, 2)  # [B, S, d]
    seq = seq.long()
    counts = torch.bincount(seq, minlength=nb)
    first = torch.cumsum(counts, 0) - counts
    r = torch.arange(t, device=q.device) - first[seq]
    tmax = int(counts.max()) if t else 0
    qp = q.new_zeros(nb, tmax, h, d, dtype=torch.float32)
    wp = q.new_zeros(nb, tmax, h, dtype=torch.float32)
    qp[seq, r], wp[seq, r] = q.float(), w.float() * w_scale
    s = torch.einsum("bths,bth->bts", torch.relu(torch.einsum("bthd,bsd->bths", qp, k)), wp)[seq, r]
    hidden = torch.arange(k.shape[1], device=q.device)[None, :] >= n_visible.to(q.device)[:, None]
    return s.masked_fill(hidden, float("-inf"))


def gated_pool_indexed(
    kv: torch.Tensor,
    score: torch.Tensor,
    state_kv: torch.Tensor,
    state_score: torch.Tensor,
    idx: torch.Tensor,
    overlap: bool,
    ape: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`gated_pool` of entries whose L candidate tokens are given by index: j < N is row j of this
    step's kv/score [N, W], j >= N row j - N of the state tails [R, W], -1 a padded slot. Candidate
    slot l's gate gets the bias ape[l % ratio] (ape [ratio, W]). With `overlap` (CSA) the first L/2
    candidates pool channels [:W/2] and the rest [W/2:]: [E, W/2]; else [E, W]. Stored as `dtype`
    (default kv's)."""
    n, r = kv.shape[0], state_kv.shape[0]
    i = idx.long()
    fresh = (i < n)[..., None]
    v = torch.where(fresh, kv.float()[i.clamp(0, max(n - 1, 0))], state_kv.float()[(i - n).clamp(0, r - 1)])
    g = torch.where(fresh, score.float()[i.clamp(0, max(n - 1, 0))], state_score.float()[(i - n).clamp(0, r - 1)])
    g = g + ape.float()[torch.arange(i.shape[1], device=i.device) % ape.shape[0]]
    g = g.masked_fill((i < 0)[..., None], float("-inf"))
    v = v.masked_fill((i < 0)[..., None], 0.0)
    if overlap:
        c, half = kv.shape[1] // 2, i.shape[1] // 2
        v = torch.cat([v[:, :half, :c], v[:, half:, c:]], dim=1)
        g = torch.cat([g[:, :half, :c], g[:, half:, c:]], dim=1)
    return gated_pool(v, g).to(dtype or kv.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(min(gate, limit)) * clamp(up, -limit, limit); limit <= 0 disables the clamp."""
    if limit > 0:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return F.silu(gate) * up


def moe_experts(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    swiglu_limit: float,
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[t] = sum_j weights[t,j] * w2[e] @ swiglu(w1[e] x[t], w3[e] x[t]), e = ids[t,j].

    Only ids in [0, E) count (E = local experts); -1 means "routed elsewhere". With `scales`
    (s1, s3, s2) the weights are packed MXFP4 (int8 [E, out, in/2]) and each used expert is decoded.
    Small calls with at least as many (token, slot) pairs as local experts run every expert on every
    token in three GEMMs, weighting the unrouted ones by 0; the rest loop over the used experts.
    `add` [T, d]: returns (add + y) in x's dtype, y rounded to x's dtype first (two outputs summed).
    """
    e, inter = w1.shape[:2]
    if e <= ids.numel() and x.shape[0] * e * inter * x.shape[1] <= DENSE_MACS:
        y = _moe_dense(x, ids, weights, w1, w3, w2, swiglu_limit, scales)
    else:
        y = _moe_loop(x, ids, weights, w1, w3, w2, swiglu_limit, scales)
    return y if add is None else (add + y).to(x.dtype)


def _moe_loop(x, ids, weights, w1, w3, w2, swiglu_limit, scales) -> torch.Tensor:
    """`moe_experts` as a loop over the used local experts."""
    e = w1.shape[0]
    xf = x.float()
    y = torch.zeros_like(xf)

    def weight(w: torch.Tensor, i: int, j: int) -> torch.Tensor:
        return w[j].float() if scales is None else dequant_fp4(w[j], scales[i][j])

    for j in torch.unique(ids).tolist():
        if not 0 <= j < e:
            continue
        tok, slot = torch.where(ids == j)
        xe = xf[tok]
        h = swiglu(xe @ weight(w1, 0, j).T, xe @ weight(w3, 1, j).T, swiglu_limit)
        y.index_add_(0, tok, (h @ weight(w2, 2, j).T) * weights[tok, slot].float()[:, None])
    return y.to(x.dtype)


def dense_expert(
    x: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    swiglu_limit: float,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """w2 @ swiglu(w1 x, w3 x) on every token (w1, w3 [I, d], w2 [d, I]); `add` as in `moe_experts`."""
    xf = x.float()
    y = (swiglu(xf @ w1.float().T, xf @ w3.float().T, swiglu_limit) @ w2.float().T).to(x.dtype)
    return y if add is None else (add + y).to(x.dtype)


# Multiply-adds per projection (tokens x local experts x I x d) up to which `moe_experts` may compute
# every expert densely: below it (v4-tiny-sized shards on a CPU) the per-expert loop's dozen small
# ops per expert cost more than the wasted rows (16 tokens on 16 experts: ~0.3 ms, not ~0.8). With
# fewer pairs than experts (a 1-token call) the loop reads only the used experts' weights and wins.
DENSE_MACS = 1 << 23


def _moe_dense(x, ids, weights, w1, w3, w2, swiglu_limit, scales) -> torch.Tensor:
    """`moe_experts` as three GEMMs over all E local experts: gate[t, e] holds the summed routing
    weight of expert e for token t (0 when not routed there)."""
    t, d = x.shape
    e, inter = w1.shape[:2]
    if scales is not None:
        w1, w3, w2 = (
            dequant_fp4(w.flatten(0, 1), s.flatten(0, 1)).view(e, w.shape[1], -1)
            for w, s in zip((w1, w3, w2), scales, strict=True)
        )
    local = torch.where((ids >= 0) & (ids < e), ids, e).long()  # e: not here (a dropped column)
    gate = torch.zeros(t, e + 1, device=x.device).scatter_add_(1, local, weights.float())[:, :e]
    xf = x.float()
    h = swiglu(xf @ w1.float().reshape(e * inter, d).T, xf @ w3.float().reshape(e * inter, d).T, swiglu_limit)
    h = h.view(t, e, inter) * gate[:, :, None]
    return torch.bmm(h.transpose(0, 1), w2.float().transpose(1, 2)).sum(0).to(x.dtype)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, act_quant: bool = True) -> torch.Tensor:
    """y[T,N] = act_quant(x) @ (w * scale)^T in fp32, cast to x's dtype.

    w is float8_e4m3fn [N, K] with UE8M0 scales per 128x128 block; x is quantised to FP8 per token
    and 128 channels (UE8M0 scales) first, as the FP8 GEMM on tensor cores sees it
    (`act_quant=False`: weight-only, x as given).
    """
    if not act_quant:
        return (x.float() @ dequant_fp8(w, scale).T).to(x.dtype)
    xq, xs = quantise_activations(x)
    xd = xq.float() * xs.repeat_interleave(128, 1)[:, : x.shape[1]]
    return (xd @ dequant_fp8(w, scale).T).to(x.dtype)


def hc_split_sinkhorn(
    mixes: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, n: int, iters: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the (2+n)*n mHC mixes into pre [T,n], post [T,n] and comb [T,n,n] (all fp32).

    pre = sigmoid(a0*m[:n] + b) + eps; post = 2*sigmoid(a1*m[n:2n] + b); comb = Sinkhorn-Knopp of
    a2*m[2n:] + b reshaped n x n: row softmax + eps, column-normalise, then iters-1 rounds of
    (row-normalise, column-normalise), each dividing by (sum + eps) (docs/deepseek-v4.md §4).
    """
    m, base, scale = mixes.float(), hc_base.float(), hc_scale.float()
    pre = torch.sigmoid(m[:, :n] * scale[0] + base[:n]) + eps
    post = 2 * torch.sigmoid(m[:, n : 2 * n] * scale[1] + base[n : 2 * n])
    comb = (m[:, 2 * n :] * scale[2] + base[2 * n :]).view(-1, n, n)
    comb = torch.softmax(comb, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return pre, post, comb


def hc_mixes(X: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """[T, M] fp32: the RMS-normalised (no gain) flattened streams X [T, n, d] times fn [M, n*d]."""
    return F.linear(rms_norm(X.flatten(1), None, eps, torch.float32), fn.float())


def hc_mixes_sinkhorn(
    X: torch.Tensor,
    fn: torch.Tensor,
    eps: float,
    hc_scale: torch.Tensor,
    hc_base: torch.Tensor,
    n: int,
    iters: int,
    hc_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`hc_split_sinkhorn` of `hc_mixes`: an mHC site's pre, post and comb from its streams."""
    return hc_split_sinkhorn(hc_mixes(X, fn, eps), hc_scale, hc_base, n, iters, hc_eps)


def hc_pre(X: torch.Tensor, pre: torch.Tensor, norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """x[t] = sum_k pre[t,k] X[t,k]: the sub-layer input from the n residual streams (X's dtype);
    norm = (weight, eps): then the sub-layer's RMSNorm of it."""
    x = torch.einsum("tk,tkd->td", pre.float(), X.float()).to(X.dtype)
    return x if norm is None else rms_norm(x, norm[0], norm[1], X.dtype)


def hc_post(f: torch.Tensor, X: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """X'[t,k] = post[t,k] f[t] + sum_j comb[t,j,k] X[t,j]: the new residual streams (X's dtype)."""
    mixed = torch.einsum("tjk,tjd->tkd", comb.float(), X.float())
    return (post.float()[:, :, None] * f.float()[:, None, :] + mixed).to(X.dtype)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    dtype: torch.dtype,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(weight *) x / rms(x) over the last dim, computed in fp32, stored as `dtype`; with rotary =
    (pos, inv_freq), then `rope` of that (as two ops would: rounded to `dtype` in between)."""
    x = x.float()
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    y = (y if weight is None else weight * y).to(dtype)
    return y if rotary is None else rope(y, *rotary, False)


def rope(
    x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, inverse: bool, hadamard: bool = False
) -> torch.Tensor:
    """x [T, ..., C] with its last 2 * len(inv_freq) channels rotated pairwise (2i, 2i+1) by
    pos[t] * inv_freq[i] (by minus that with `inverse`); a new tensor of x's dtype, or with `hadamard`
    that tensor's Walsh-Hadamard rotation (`kv_format.hadamard`, fp32)."""
    if hadamard:
        return kv_format.hadamard(rope(x, pos, inv_freq, inverse))
    dim = 2 * inv_freq.shape[0]
    angles = torch.outer(pos.to(torch.float32), inv_freq.float())
    rot = torch.polar(torch.ones_like(angles), angles)
    if inverse:
        rot = rot.conj()
    rot = rot.view(rot.shape[0], *([1] * (x.dim() - 2)), rot.shape[-1])
    head, tail = x[..., :-dim], x[..., -dim:]
    z = torch.view_as_complex(tail.float().unflatten(-1, (-1, 2)).contiguous())
    tail = torch.view_as_real(z * rot).flatten(-2).to(x.dtype)
    return torch.cat([head, tail], dim=-1)


def copy_rows(dst: torch.Tensor, dst_rows: torch.Tensor, src: torch.Tensor, src_rows: torch.Tensor) -> None:
    """dst[dst_rows[i]] = src[src_rows[i]], in place."""
    dst[dst_rows] = src[src_rows]


def moe_route(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    scale: float,
    tid2eid: torch.Tensor | None,
    input_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T,k] fp32, ids [T,k] int64) of the router: s = sqrt(softplus(x W^T)) in fp32; ids the
    top-k of s + bias, or tid2eid[input_ids] on hash layers; weights = s[ids] / sum * scale."""
    scores = F.softplus(F.linear(x.float(), weight.float())).sqrt()
    if tid2eid is not None:
        ids = tid2eid[input_ids].long()
    else:
        ids = (scores + bias).topk(k, dim=-1).indices
    weights = scores.gather(1, ids)
    return weights / weights.sum(-1, keepdim=True) * scale, ids


def pack_main(
    x: torch.Tensor,
    rope_dim: int,
    out: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    norm: RowNorm | None = None,
) -> torch.Tensor:
    """`kv_format.pack_main` of the rows (of their `rms_norm` with `norm`); with out/rows written to
    out[rows] (returns out)."""
    return _into(kv_format.pack_main(_normed(x, norm), rope_dim), out, rows)


def pack_index(
    x: torch.Tensor,
    out: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    rotate: bool = False,
    norm: RowNorm | None = None,
) -> torch.Tensor:
    """`kv_format.pack_index` of the rows (of their `rms_norm` with `norm`; `kv_format.hadamard` of
    that first with `rotate`); with out/rows written to out[rows] (returns out)."""
    x = _normed(x, norm)
    return _into(kv_format.pack_index(kv_format.hadamard(x) if rotate else x), out, rows)


def _normed(x: torch.Tensor, norm: RowNorm | None) -> torch.Tensor:
    return x if norm is None else rms_norm(x, norm.weight, norm.eps, x.dtype, norm.rotary)


def _into(packed: torch.Tensor, out: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return packed
    out[rows] = packed
    return out
