"""FP8 block-scaled GEMM, as DeepSeek's inference code runs its FP8 linear layers.

y[M,N] = x[M,K] @ W[N,K]^T with W float8_e4m3fn and one UE8M0 scale per 128x128 block. The
activations are quantised too (`_act_quant_kernel`: per row and 128 channels, power-of-two scale),
so the main loop is an FP8 x FP8 tensor-core dot per 128-wide K block, fp32 accumulation, scaled by
a_s[m] * b_s[n] per block. Why not weight-only dequantisation to bf16: prefill is compute-bound,
and FP8 dots run at twice the bf16 rate on Hopper; decode is bound by the weight bytes read, which
are FP8 either way. It is also the arithmetic the released model was served with.

`act_quant=False` is the alternative, weight-only dequantisation: x stays 16-bit and each FP8
weight tile is scaled and converted in registers before a bf16/fp16 dot (`bench/kernels.py` times
both side by side). Under the interpreter (CPU tests) operands are widened to fp32 before the dot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4d.kernels.launch import dot_dtype, gpu_sms, interpreting, pow2

BLOCK = 128  # the checkpoint's quantisation block along both dims


@triton.jit
def _ue8m0_exp(ratio):
    """ceil(log2(ratio)) for ratio > 0, exactly (from the fp32 bits), as an fp32."""
    bits = tl.maximum(ratio, 1.1754943508222875e-38).to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return e.to(tl.float32)


@triton.jit
def _round_e4m3(v):
    """v (|v| <= 448) rounded to the nearest E4M3 value, ties to even, in fp32: adding and removing
    1.5 * 2^(23 + ulp exponent) makes fp32 rounding drop exactly the bits E4M3 lacks. The cast that
    follows is then exact (the interpreter's own fp32 -> fp8 cast misrounds some values)."""
    bits = v.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # below 2^-6 E4M3 is subnormal: ulp 2^-9
    c = 1.5 * tl.exp2((e + 20).to(tl.float32))  # 2^(e - 3) is the ulp
    return (v + c) - c


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, sx, sq, ss, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    kb = tl.program_id(1)
    offs = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = offs < K
    x = tl.load(x_ptr + row * sx + offs, mask=ok, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), 0)
    e = tl.where(amax > 0, _ue8m0_exp(amax / 448.0), 0.0)
    q = _round_e4m3(x * tl.exp2(-e))
    tl.store(q_ptr + row * sq + offs, q.to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(s_ptr + row * ss + kb, tl.exp2(e))


@triton.jit
def _fp8_gemm_kernel(
    a_ptr,
    as_ptr,
    b_ptr,
    bs_ptr,
    c_ptr,
    M,
    N,
    K,
    KB_PER_SPLIT,
    sa,
    sas,
    sb,
    sbs,
    sc,
    s_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FP8_DOT: tl.constexpr,
    W_ONLY: tl.constexpr,
    DOT: tl.constexpr,
):
    """W_ONLY: a is the 16-bit x itself (no scales), W dequantised per tile to DOT before the dot.
    Program (m tile, n tile, split): K blocks split*KB_PER_SPLIT.. of the tile, written to
    c[split] (fp32 partials, summed by the launcher) or, unsplit, straight to the output."""
    pid_m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * sa
    b_cols = b_ptr + offs_n.to(tl.int64)[None, :] * sb
    bs_rows = bs_ptr + (offs_n // BLOCK_K) * sbs
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    kb0 = split * KB_PER_SPLIT
    for kb in range(kb0, tl.minimum(kb0 + KB_PER_SPLIT, tl.cdiv(K, BLOCK_K))):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(a_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_cols + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        b_s = tl.exp2(tl.load(bs_rows + kb, mask=n_ok, other=127).to(tl.float32) - 127.0)
        if W_ONLY:
            acc += tl.dot(a.to(DOT), (b.to(tl.float32) * b_s[None, :]).to(DOT), input_precision="ieee")
        else:
            a_s = tl.load(as_ptr + offs_m * sas + kb, mask=m_ok, other=0.0)
            if FP8_DOT:
                part = tl.dot(a, b)
            else:
                part = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            acc += part * a_s[:, None] * b_s[None, :]
    c_ptr += split.to(tl.int64) * s_split
    tl.store(
        c_ptr + offs_m.to(tl.int64)[:, None] * sc + offs_n[None, :],
        acc.to(c_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


def quantise_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M,K] -> (float8_e4m3fn [M,K], fp32 [M, ceil(K/128)]): v4d.kernels.quant.act_quant on the GPU."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, triton.cdiv(k, BLOCK), dtype=torch.float32, device=x.device)
    if m:
        _act_quant_kernel[(m, triton.cdiv(k, BLOCK))](
            x, q, s, k, x.stride(0), q.stride(0), s.stride(0), BLOCK_K=BLOCK, num_warps=1 if interpreting() else 4
        )
    return q, s


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, act_quant: bool = True) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    x, w = x.contiguous(), w.contiguous()
    bs = scale.contiguous().view(torch.uint8)
    q, s = quantise_activations(x) if act_quant else (x, x)
    if interpreting():
        bm, bn, warps, stages = min(pow2(m, 16), 64), min(pow2(n, 16), 128), 4, 1
    elif m <= 64:  # decode: bound by the weight bytes; narrow N tiles so every SM streams weights
        bm, bn, warps, stages = max(16, pow2(m)), 64, 4, 4
    else:  # prefill: compute-bound, big tiles on the FP8 tensor cores
        bm, bn, warps, stages = 128, 128, 8, 3
    sms, kbs = gpu_sms(x.device), triton.cdiv(k, BLOCK)
    if interpreting() and sms is None:  # few splits of the interpreter's tiles, so split-K is tested
        tiles, sms = triton.cdiv(m, bm) * triton.cdiv(n, bn), 4
    else:  # the GPU's decode tiles (also under launch.as_on_gpu; 132 SMs when compiling off CUDA)
        tiles, sms = triton.cdiv(m, max(16, pow2(m))) * triton.cdiv(n, 64), sms or 132
    # Decode with few output tiles (e.g. V4-Flash wo_b: N=4096 -> 64 tiles on 132 SMs): split K so
    # about two programs per SM stream weights; the fp32 partials are a few MB against the weight.
    per = triton.cdiv(kbs, max(1, min(kbs, triton.cdiv(2 * sms, tiles)))) if m <= 64 else kbs
    splits = triton.cdiv(kbs, per)
    dest = out if splits == 1 else torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    _fp8_gemm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn), splits)](
        q,
        s,
        w,
        bs,
        dest,
        m,
        n,
        k,
        per,
        q.stride(0),
        s.stride(0),
        w.stride(0),
        bs.stride(0),
        dest.stride(-2),
        m * n,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=BLOCK,
        FP8_DOT=not interpreting(),
        W_ONLY=not act_quant,
        DOT=dot_dtype(x),
        num_warps=warps,
        num_stages=stages,
    )
    return out if splits == 1 else dest.sum(0).to(x.dtype)
