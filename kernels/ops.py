"""The one ops interface the model calls: Triton kernels on CUDA, torch references elsewhere.

Dispatch is decided per call from the tensors' device and `V4D_KERNELS`:
  unset / "auto"  Triton when the tensors are on a CUDA device and Triton imports, else reference
                  (CPU, Ascend NPU, ...);
  "reference"     always the torch reference;
  "triton"        always Triton; for CPU tensors that means the Triton interpreter, which this
                  module switches on (TRITON_INTERPRET=1) before the kernels are first imported.
Shapes are checked here, once for both paths, so bad input fails the same way everywhere.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import torch

from v4d.kernels import kv_format, reference
from v4d.kernels.rownorm import RowNorm

MODES = ("auto", "reference", "triton")
_triton_backend: ModuleType | None = None


def kernel_mode() -> str:
    mode = os.environ.get("V4D_KERNELS", "auto") or "auto"
    if mode not in MODES:
        raise ValueError(f"V4D_KERNELS={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _load_triton(device: torch.device) -> ModuleType:
    """Import the kernel modules once; the interpreter flag is read when `@triton.jit` runs."""
    global _triton_backend
    if _triton_backend is None:
        if device.type != "cuda":
            os.environ.setdefault("TRITON_INTERPRET", "1")
        from v4d.kernels import triton_backend

        _triton_backend = triton_backend
    elif device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "V4D_KERNELS=triton with CPU tensors needs the Triton interpreter, but the kernels were "
            "already compiled for a GPU in this process; set TRITON_INTERPRET=1 before start-up"
        )
    return _triton_backend


def backend(device: torch.device) -> ModuleType:
    """The module (reference or Triton launchers, same function names) serving `device`."""
    mode = kernel_mode()
    if mode == "reference":
        return reference
    if mode == "auto" and (device.type != "cuda" or not triton_available()):
        return reference
    if not triton_available():
        raise RuntimeError("V4D_KERNELS=triton but the triton package is not installed")
    return _load_triton(device)


def _expect(ok: bool, op: str, what: str, got: object) -> None:
    if not ok:
        raise ValueError(f"{op}: expected {what}, got {got}")


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


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
    """o[T,H,D] like `reference.sparse_attention`, with idx addressing the step's fresh entries kv [N,*]
    (j < N), then the flattened window rings [R,*] and the flattened page store [S,*], all three in
    one format (plain rows or packed deployed entries), read in place: one call serves every sequence
    of the batch. unrotate = (pos [T], inv_freq): o's inverse `rope` in the same launch. q_norm: the
    queries are `rms_norm(q, weight, eps, q.dtype, rotary)` of the given q (per head), in the same launch."""
    op = "paged_sparse_attention"
    _expect(q.dim() == 3, op, "q of shape [T,H,D]", _shape(q))
    t, h, d = q.shape
    for name, src in (("kv", kv), ("ring", ring), ("store", store)):
        if src is None:
            continue
        _expect(src.dim() == 2, op, f"{name} of shape [R,width]", _shape(src))
        _expect(
            (src.dtype == torch.uint8) == (ring.dtype == torch.uint8), op, f"{name} in the ring's format", src.dtype
        )
        width = kv_format.main_bytes(d, rope_dim) if src.dtype == torch.uint8 else d
        _expect(src.shape[1] == width, op, f"{name} rows of width {width} ({src.dtype})", src.shape[1])
    _expect(idx.dim() == 2 and idx.shape[0] == t, op, f"idx of shape [{t},K]", _shape(idx))
    _expect(idx.dtype in (torch.int32, torch.int64), op, "idx int32 or int64", idx.dtype)
    _expect(_shape(sink) == [h], op, f"sink of shape [{h}]", _shape(sink))
    _expect(0 <= rope_dim <= d, op, f"rope_dim in 0..{d}", rope_dim)
    if unrotate is not None:
        pos, inv_freq = unrotate
        _expect(_shape(pos) == [t], op, f"pos of shape [{t}]", _shape(pos))
        _expect(inv_freq.dim() == 1 and 2 * inv_freq.shape[0] <= d, op, f"inv_freq [<= {d // 2}]", _shape(inv_freq))
    _check_norm(op, q, q_norm, None)
    return backend(q.device).paged_sparse_attention(
        q, kv, ring, store, idx, sink, float(scale), int(rope_dim), unrotate, q_norm
    )


def paged_indexer_scores(
    q: torch.Tensor,
    w: torch.Tensor,
    keys: torch.Tensor,
    block_table: torch.Tensor,
    seq: torch.Tensor,
    n_visible: torch.Tensor,
    w_scale: float = 1.0,
) -> torch.Tensor:
    """scores[T, P*E] (fp32) of each row against its own sequence's keys, read from the pages
    block_table[seq[t]] of keys [pages, E, *] (plain or packed FP4); -inf from n_visible[t] on.
    Head weights are w * w_scale (in fp32: the indexer's scale without a launch of its own)."""
    op = "paged_indexer_scores"
    _expect(q.dim() == 3, op, "q of shape [T,Hi,Di]", _shape(q))
    t, h, d = q.shape
    _expect(_shape(w) == [t, h], op, f"w of shape [{t},{h}]", _shape(w))
    width = kv_format.index_bytes(d) if keys.dtype == torch.uint8 else d
    _expect(keys.dim() == 3 and keys.shape[2] == width, op, f"keys of shape [pages,E,{width}]", _shape(keys))
    _expect(
        block_table.dim() == 2 and not block_table.is_floating_point(),
        op,
        "integer block_table of shape [B,P]",
        _shape(block_table),
    )
    _expect(_shape(seq) == [t] and not seq.is_floating_point(), op, f"integer seq of shape [{t}]", _shape(seq))
    _expect(_shape(n_visible) == [t], op, f"n_visible of shape [{t}]", _shape(n_visible))
    _expect(not n_visible.is_floating_point(), op, "integer n_visible", n_visible.dtype)
    return backend(q.device).paged_indexer_scores(q, w, keys, block_table, seq, n_visible, float(w_scale))


def indexer_topk(
    scores: torch.Tensor,
    k: int,
    rows: tuple[torch.Tensor, torch.Tensor, int, int] | None = None,
    prefix: torch.Tensor | None = None,
) -> torch.Tensor:
    """idx[T,k] int32 of the k best finite scores per row (as a set), -1 in unused slots.

    rows = (block_table [B,P], seq [T], E, offset): each chosen entry s of row t is written as the
    attention index offset + block_table[seq[t], s // E] * E + s % E (its page-store row); prefix [T,W]:
    its columns come first ([T, W + k]). Together: a CSA layer's attention indices, one launch."""
    op = "indexer_topk"
    _expect(scores.dim() == 2, op, "scores of shape [T,S]", _shape(scores))
    t = scores.shape[0]
    _expect(isinstance(k, int) and k >= 0, op, "k a non-negative int", k)
    if rows is not None:
        table, seq, per_page, offset = rows
        _expect(table.dim() == 2 and not table.is_floating_point(), op, "integer block_table [B,P]", _shape(table))
        _expect(
            table.shape[1] * per_page >= scores.shape[1],
            op,
            f"a table covering {scores.shape[1]} entries",
            table.shape[1] * per_page,
        )
        _expect(_shape(seq) == [t] and not seq.is_floating_point(), op, f"integer seq of shape [{t}]", _shape(seq))
        rows = (table, seq, int(per_page), int(offset))
    if prefix is not None:
        _expect(prefix.dim() == 2 and prefix.shape[0] == t, op, f"prefix of shape [{t},W]", _shape(prefix))
    return backend(scores.device).indexer_topk(scores, k, rows, prefix)


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
    """[E,C]: `reference.gated_pool` of entries whose candidates idx[E,L] are rows of kv/score [N,W] (j < N)
    or of the state tails [R,W] (j - N); -1 pads. Candidate slot l's gate gets the position bias
    ape[l % ratio] (ape [ratio, W]: candidates run over whole blocks, so slot l sits at phase l % ratio).
    overlap (CSA): C = W/2, the first L/2 candidates pool channels [:C] and the rest [C:]; else C = W.
    Computed in fp32, stored as `dtype` (default kv's): the entries' dtype without a cast launch."""
    op = "gated_pool_indexed"
    _expect(kv.dim() == 2, op, "kv of shape [N,W]", _shape(kv))
    _expect(score.shape == kv.shape, op, f"score of shape {_shape(kv)}", _shape(score))
    w = kv.shape[1]
    _expect(state_kv.dim() == 2 and state_kv.shape[1] == w, op, f"state_kv of shape [R,{w}]", _shape(state_kv))
    _expect(state_score.shape == state_kv.shape, op, f"state_score of shape {_shape(state_kv)}", _shape(state_score))
    _expect(idx.dim() == 2 and not idx.is_floating_point(), op, "integer idx of shape [E,L]", _shape(idx))
    if overlap:
        _expect(w % 2 == 0 and idx.shape[1] % 2 == 0, op, "even W and L with overlap", [w, idx.shape[1]])
    _expect(ape.dim() == 2 and ape.shape[1] == w and ape.shape[0] >= 1, op, f"ape of shape [ratio,{w}]", _shape(ape))
    return backend(kv.device).gated_pool_indexed(
        kv, score, state_kv, state_score, idx, bool(overlap), ape, dtype or kv.dtype
    )


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
    """y[T,d] = sum_j weights[t,j] * expert ids[t,j] (x[t]) over local experts (-1 = not here);
    `add` [T,d]: add + y in the same launch, x's dtype, y rounded to it first as two outputs summed
    would be.

    Plain weights: w1, w3 [E,I,d], w2 [E,d,I]. Packed MXFP4 (`scales` = (s1, s3, s2) given): w1, w3
    int8 [E,I,d/2], w2 int8 [E,d,I/2] (two E2M1 codes per byte, even index low), scales UE8M0
    [E,I,d/32], [E,I,d/32], [E,d,I/32] (float8_e8m0fnu or their uint8 bytes).
    """
    op = "moe_experts"
    _expect(x.dim() == 2, op, "x of shape [T,d]", _shape(x))
    t, d = x.shape
    _expect(ids.dim() == 2 and ids.shape[0] == t, op, f"ids of shape [{t},k]", _shape(ids))
    _expect(not ids.is_floating_point(), op, "integer ids", ids.dtype)
    _expect(weights.shape == ids.shape, op, f"weights of shape {_shape(ids)}", _shape(weights))
    p = 1 if scales is None else 2  # values per stored element along the input dim
    _expect(w1.dim() == 3 and w1.shape[2] * p == d, op, f"w1 of shape [E,I,{d // p}]", _shape(w1))
    e, i, _ = w1.shape
    _expect(w3.shape == w1.shape, op, f"w3 of shape {_shape(w1)}", _shape(w3))
    _expect(_shape(w2) == [e, d, i // p], op, f"w2 of shape {[e, d, i // p]}", _shape(w2))
    if scales is not None:
        _expect(len(scales) == 3, op, "scales = (s1, s3, s2)", len(scales))
        _expect(w1.dtype in (torch.int8, torch.uint8), op, "packed int8 w1/w3/w2 with scales", w1.dtype)
        _expect(d % 32 == 0 and i % 32 == 0, op, "d and I multiples of 32 for MXFP4", (d, i))
        for name, s, want in zip(
            ("s1", "s3", "s2"), scales, ([e, i, d // 32], [e, i, d // 32], [e, d, i // 32]), strict=True
        ):
            _expect(_shape(s) == want, op, f"{name} of shape {want}", _shape(s))
        scales = tuple(s.view(torch.float8_e8m0fnu) for s in scales)
    if add is not None:
        _expect(_shape(add) == [t, d], op, f"add of shape [{t},{d}]", _shape(add))
    return backend(x.device).moe_experts(x, ids, weights, w1, w3, w2, float(swiglu_limit), scales, add)


def dense_expert(
    x: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    swiglu_limit: float,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """One expert on every token (the shared expert): y[T,d] = w2 @ (silu(min(w1 x, lim)) * clamp(w3 x,
    -lim, lim)), w1, w3 [I,d], w2 [d,I]; `add` [T,d]: add + y as in `moe_experts`. Bitwise
    `moe_experts` with every token routed to expert 0 with weight 1, in 2 launches instead of 4."""
    op = "dense_expert"
    _expect(x.dim() == 2, op, "x of shape [T,d]", _shape(x))
    t, d = x.shape
    _expect(w1.dim() == 2 and w1.shape[1] == d, op, f"w1 of shape [I,{d}]", _shape(w1))
    i = w1.shape[0]
    _expect(w3.shape == w1.shape, op, f"w3 of shape {_shape(w1)}", _shape(w3))
    _expect(_shape(w2) == [d, i], op, f"w2 of shape {[d, i]}", _shape(w2))
    if add is not None:
        _expect(_shape(add) == [t, d], op, f"add of shape [{t},{d}]", _shape(add))
    return backend(x.device).dense_expert(x, w1, w3, w2, float(swiglu_limit), add)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, act_quant: bool = True) -> torch.Tensor:
    """y[T,N] = x[T,K] @ W^T, W float8_e4m3fn [N,K] with UE8M0 scales [ceil(N/128), ceil(K/128)].

    x is quantised to FP8 per token and 128 channels (UE8M0) before the block-scaled GEMM (fp32
    accumulation); y has x's dtype. `act_quant=False`: weight-only dequantisation (x not rounded),
    the measured alternative (docs/precision.md); the model uses the default.
    """
    op = "fp8_linear"
    _expect(x.dim() == 2 and x.is_floating_point(), op, "x of shape [T,K], floating point", _shape(x))
    k = x.shape[1]
    _expect(w.dim() == 2 and w.shape[1] == k, op, f"w of shape [N,{k}]", _shape(w))
    _expect(w.dtype == torch.float8_e4m3fn, op, "w of dtype float8_e4m3fn", w.dtype)
    want = [-(-w.shape[0] // 128), -(-k // 128)]
    _expect(_shape(scale) == want, op, f"scale of shape {want}", _shape(scale))
    _expect(scale.dtype in (torch.float8_e8m0fnu, torch.uint8), op, "scale float8_e8m0fnu", scale.dtype)
    return backend(x.device).fp8_linear(x, w, scale.view(torch.float8_e8m0fnu), bool(act_quant))


def moe_route(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    scale: float,
    tid2eid: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T,k] fp32, ids [T,k] int64): the router of x [T,d] over experts weight [E,d] in one
    launch. s = sqrt(softplus(x W^T)) in fp32; ids = top-k of s + bias [E] (largest first), or on hash
    layers (tid2eid [vocab,k] given) tid2eid[input_ids]; weights = s[ids] normalised to sum 1, times scale."""
    op = "moe_route"
    _expect(x.dim() == 2, op, "x of shape [T,d]", _shape(x))
    t, d = x.shape
    _expect(weight.dim() == 2 and weight.shape[1] == d, op, f"weight of shape [E,{d}]", _shape(weight))
    e = weight.shape[0]
    _expect(isinstance(k, int) and 1 <= k <= e, op, f"k in 1..{e}", k)
    if tid2eid is None:
        _expect(bias is not None and _shape(bias) == [e], op, f"bias of shape [{e}] (or a hash table)", bias)
    else:
        _expect(tid2eid.dim() == 2 and tid2eid.shape[1] == k, op, f"tid2eid of shape [vocab,{k}]", _shape(tid2eid))
        _expect(input_ids is not None and _shape(input_ids) == [t], op, f"input_ids of shape [{t}]", input_ids)
    return backend(x.device).moe_route(x, weight, bias, k, float(scale), tid2eid, input_ids)


def copy_rows(dst: torch.Tensor, dst_rows: torch.Tensor, src: torch.Tensor, src_rows: torch.Tensor) -> None:
    """dst[dst_rows[i]] = src[src_rows[i]] in place (2-D dst and src of one dtype and width), one launch:
    the window-ring and compressor-tail writes of a step."""
    op = "copy_rows"
    _expect(dst.dim() == 2 and src.dim() == 2, op, "2-D dst and src", [_shape(dst), _shape(src)])
    _expect(dst.shape[1] == src.shape[1] and dst.dtype == src.dtype, op, f"src like dst {dst.dtype}", src.dtype)
    _expect(dst.stride(1) == 1, op, "dst rows contiguous", dst.stride())
    _expect(dst_rows.shape == src_rows.shape and dst_rows.dim() == 1, op, "dst_rows and src_rows [M]", _shape(src_rows))
    backend(dst.device).copy_rows(dst, dst_rows, src, src_rows)


def hc_split_sinkhorn(
    mixes: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, n: int, iters: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pre[T,n], post[T,n], comb[T,n,n] (fp32) from the mHC mixes (docs/deepseek-v4.md §4 steps 3-5)."""
    op = "hc_split_sinkhorn"
    m = (2 + n) * n
    _expect(mixes.dim() == 2 and mixes.shape[1] == m, op, f"mixes of shape [T,{m}]", _shape(mixes))
    _expect(_shape(hc_scale) == [3], op, "hc_scale of shape [3]", _shape(hc_scale))
    _expect(_shape(hc_base) == [m], op, f"hc_base of shape [{m}]", _shape(hc_base))
    _expect(iters >= 1, op, "iters >= 1", iters)
    return backend(mixes.device).hc_split_sinkhorn(mixes, hc_scale, hc_base, n, iters, float(eps))


def hc_mixes(X: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """mixes[T,M] (fp32) = (X[T,n,d] flattened, RMS-normalised without gain) @ fn[M, n*d]^T: the mHC
    projection that feeds `hc_split_sinkhorn` (or the head's sigmoid), one launch."""
    op = "hc_mixes"
    _expect(X.dim() == 3, op, "X of shape [T,n,d]", _shape(X))
    width = X.shape[1] * X.shape[2]
    _expect(fn.dim() == 2 and fn.shape[1] == width, op, f"fn of shape [M,{width}]", _shape(fn))
    return backend(X.device).hc_mixes(X, fn, float(eps))


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
    """pre[T,n], post[T,n], comb[T,n,n] (fp32) = `hc_split_sinkhorn(hc_mixes(X, fn, eps), hc_scale,
    hc_base, n, iters, hc_eps)` in one launch (the same math: the split reads the mixes as stored)."""
    op = "hc_mixes_sinkhorn"
    m = (2 + n) * n
    _expect(X.dim() == 3 and X.shape[1] == n, op, f"X of shape [T,{n},d]", _shape(X))
    _expect(_shape(fn) == [m, n * X.shape[2]], op, f"fn of shape [{m},{n * X.shape[2]}]", _shape(fn))
    _expect(_shape(hc_scale) == [3], op, "hc_scale of shape [3]", _shape(hc_scale))
    _expect(_shape(hc_base) == [m], op, f"hc_base of shape [{m}]", _shape(hc_base))
    _expect(iters >= 1, op, "iters >= 1", iters)
    return backend(X.device).hc_mixes_sinkhorn(X, fn, float(eps), hc_scale, hc_base, n, iters, float(hc_eps))


def hc_pre(X: torch.Tensor, pre: torch.Tensor, norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """x[T,d] = sum_k pre[t,k] X[t,k] (X's dtype); norm = (weight [d], eps): the sub-layer's RMSNorm of
    x in the same launch (x rounded to X's dtype first, as two ops would)."""
    op = "hc_pre"
    _expect(X.dim() == 3, op, "X of shape [T,n,d]", _shape(X))
    _expect(_shape(pre) == _shape(X)[:2], op, f"pre of shape {_shape(X)[:2]}", _shape(pre))
    if norm is not None:
        _expect(_shape(norm[0]) == [X.shape[2]], op, f"norm weight of shape [{X.shape[2]}]", _shape(norm[0]))
        norm = (norm[0], float(norm[1]))
    return backend(X.device).hc_pre(X, pre, norm)


def hc_post(f: torch.Tensor, X: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """X'[T,n,d] = post[t,k] f[t] + sum_j comb[t,j,k] X[t,j] (X's dtype)."""
    op = "hc_post"
    _expect(X.dim() == 3, op, "X of shape [T,n,d]", _shape(X))
    t, n, d = X.shape
    _expect(_shape(f) == [t, d], op, f"f of shape [{t},{d}]", _shape(f))
    _expect(_shape(post) == [t, n], op, f"post of shape [{t},{n}]", _shape(post))
    _expect(_shape(comb) == [t, n, n], op, f"comb of shape [{t},{n},{n}]", _shape(comb))
    return backend(X.device).hc_post(f, X, post, comb)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    dtype: torch.dtype | None = None,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(weight *) x / rms(x) over the last dim in fp32, stored as `dtype` (default x's): the norms
    of the block, the query/KV/compressor norms and the mHC pre-norm, one launch each. rotary =
    (pos [T], inv_freq): x is [T, ..., C] and the result's last 2 * len(inv_freq) channels get `rope`
    at pos[t] in the same launch (the query, KV and compressed-entry norms)."""
    op = "rms_norm"
    _expect(x.dim() >= 1 and x.is_floating_point(), op, "floating point x of shape [..., C]", _shape(x))
    if weight is not None:
        _expect(_shape(weight) == [x.shape[-1]], op, f"weight of shape [{x.shape[-1]}]", _shape(weight))
    if rotary is not None:
        pos, inv_freq = rotary
        _expect(x.dim() >= 2 and _shape(pos) == [x.shape[0]], op, f"pos of shape [{x.shape[0]}]", _shape(pos))
        _expect(inv_freq.dim() == 1 and 2 * inv_freq.shape[0] <= x.shape[-1], op, "inv_freq [<= C/2]", _shape(inv_freq))
    return backend(x.device).rms_norm(x, weight, float(eps), dtype or x.dtype, rotary)


def rope(
    x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False, hadamard: bool = False
) -> torch.Tensor:
    """x [T, ..., C] with its last 2 * len(inv_freq) channels rotated pairwise (2i, 2i+1) by the
    angle pos[t] * inv_freq[i] (minus it with `inverse`); a new tensor of x's dtype. `hadamard`: then
    rotated by the Walsh-Hadamard matrix over C (a power of two), as `kv_format.hadamard` of that
    tensor (fp32): the deployed indexer query's two steps in one launch."""
    op = "rope"
    _expect(x.dim() >= 2, op, "x of shape [T, ..., C]", _shape(x))
    c = x.shape[-1]
    _expect(not hadamard or (c & (c - 1) == 0 and c <= 256), op, "a power-of-two C <= 256 with hadamard", c)
    _expect(_shape(pos) == [x.shape[0]], op, f"pos of shape [{x.shape[0]}]", _shape(pos))
    _expect(
        inv_freq.dim() == 1 and 2 * inv_freq.shape[0] <= x.shape[-1],
        op,
        f"inv_freq of shape [<= {x.shape[-1] // 2}]",
        _shape(inv_freq),
    )
    return backend(x.device).rope(x, pos, inv_freq, bool(inverse), bool(hadamard))


def pack_main(
    x: torch.Tensor,
    rope_dim: int,
    out: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    norm: RowNorm | None = None,
) -> torch.Tensor:
    """[R, main_bytes] uint8: rows x [R, d] as deployed main entries (kernels/kv_format.py layout:
    FP8 E4M3 + UE8M0 per 64 nope values, BF16 rope dims), one launch. With `out` (a store [S,
    main_bytes]) and `rows` [R]: row i is written to out[rows[i]] in place and out is returned.
    `norm`: the rows' `rms_norm` (and RoPE of the rope dims) packed, in the same launch."""
    op = "pack_main"
    _expect(x.dim() == 2 and x.is_floating_point(), op, "floating point x of shape [R, d]", _shape(x))
    _expect(0 <= rope_dim <= x.shape[1] and rope_dim % 2 == 0, op, f"an even rope_dim in 0..{x.shape[1]}", rope_dim)
    _check_into(op, x, out, rows, kv_format.main_bytes(x.shape[1], rope_dim))
    _check_norm(op, x, norm, rope_dim)
    return backend(x.device).pack_main(x, int(rope_dim), out, rows, norm)


def pack_index(
    x: torch.Tensor,
    out: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    rotate: bool = False,
    norm: RowNorm | None = None,
) -> torch.Tensor:
    """[R, index_bytes] uint8: indexer keys x [R, d] as FP4 E2M1 + UE8M0 per 32 (kernels/kv_format.py
    layout), one launch; `rotate`: their normalised Walsh-Hadamard rotation (`kv_format.hadamard`,
    d a power of two) first; `out`/`rows`/`norm` as in `pack_main` (the norm before the rotation)."""
    op = "pack_index"
    _expect(
        x.dim() == 2 and x.is_floating_point() and x.shape[1] % 2 == 0,
        op,
        "floating point x of shape [R, d], d even",
        _shape(x),
    )
    d = x.shape[1]
    _expect(not rotate or d & (d - 1) == 0, op, "a power-of-two d to rotate", d)
    _check_into(op, x, out, rows, kv_format.index_bytes(x.shape[1]))
    _check_norm(op, x, norm, None)
    return backend(x.device).pack_index(x, out, rows, bool(rotate), norm)


def _check_norm(op: str, x: torch.Tensor, norm: RowNorm | None, rope_dim: int | None) -> None:
    """An op's `norm` of x [R, ..., C]: a gain per channel or none; RoPE positions per row, over
    rope_dim channels when given."""
    if norm is None:
        return
    c = x.shape[-1]
    if norm.weight is not None:
        _expect(_shape(norm.weight) == [c], op, f"norm.weight of shape [{c}]", _shape(norm.weight))
    if norm.rotary is not None:
        pos, f = norm.rotary
        _expect(_shape(pos) == [x.shape[0]], op, f"norm.rotary pos of shape [{x.shape[0]}]", _shape(pos))
        want = f"[{rope_dim // 2}]" if rope_dim is not None else f"[<= {c // 2}]"
        ok = f.dim() == 1 and (2 * f.shape[0] == rope_dim if rope_dim is not None else 2 * f.shape[0] <= c)
        _expect(ok, op, f"norm.rotary inv_freq of shape {want}", _shape(f))


def _check_into(op: str, x: torch.Tensor, out: torch.Tensor | None, rows: torch.Tensor | None, width: int) -> None:
    _expect((out is None) == (rows is None), op, "out and rows together", (out is None, rows is None))
    if out is not None and rows is not None:
        _expect(
            out.dim() == 2 and out.dtype == torch.uint8 and out.shape[1] == width and out.stride(1) == 1,
            op,
            f"out a uint8 store [S,{width}]",
            [*_shape(out), out.dtype],
        )
        _expect(_shape(rows) == [x.shape[0]] and not rows.is_floating_point(), op, f"rows [{x.shape[0]}]", rows)


def store_rows(
    x: torch.Tensor,
    store: torch.Tensor,
    rope_dim: int | None,
    rows: torch.Tensor | None = None,
    norm: RowNorm | None = None,
) -> torch.Tensor:
    """Rows of `x` in `store`'s format: packed main entries (rope_dim given; `pack_main`), packed
    indexer keys in the Hadamard basis (rope_dim None; `pack_index(rotate=True)`), or a cast for
    plain stores. With `rows`: written to store[rows] in place instead (packed: in the packing launch)
    and store is returned. `norm`: the rows' `rms_norm` (and RoPE) stored, packed in the same launch."""
    if store.dtype == torch.uint8:
        into = (store, rows) if rows is not None else (None, None)
        if rope_dim is not None:
            return pack_main(x, rope_dim, *into, norm=norm)
        return pack_index(x, *into, rotate=True, norm=norm)
    if norm is not None:  # plain stores (exactness runs): the norm's own launch
        x = rms_norm(x, norm.weight, norm.eps, x.dtype, norm.rotary)
    if rows is None:
        return x.to(store.dtype)
    store[rows] = x.to(store.dtype)
    return store
