"""Compile every Triton kernel for an NVIDIA GPU (sm_90) on a machine without one.

The interpreter tests prove the kernels' arithmetic, not that they lower to PTX: a kernel can run
in the interpreter and still fail to compile. This script calls every op once per dtype at small
shapes on CPU tensors with the interpreter off (so the GPU block sizes and tensor-core dot types
are chosen), records each kernel launch instead of running it, and compiles each distinct
(kernel, argument types, constexprs) with Triton's own compiler and ptxas.

    .venv/bin/python scripts/kernels-compile-check.py      # about a minute of CPU; exit 1 on failure
"""

from __future__ import annotations

import inspect
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # compiled-kernel mode; launches are recorded, never run

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from v4d.kernels import kv_format, paged, routing, sinkhorn, triton_backend  # noqa: E402
from v4d.kernels.rownorm import RowNorm  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (H100, H200)
TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.float8_e4m3fn: "fp8e4nv",
    torch.uint8: "u8",
    torch.int8: "i8",
}
OPTIONS = ("num_warps", "num_stages")
launches: dict[tuple, tuple] = {}


def record(self, *args, grid, warmup, **kwargs):
    names = list(inspect.signature(self.fn).parameters)  # self: the JITFunction being launched
    sig, consts = {}, {}
    for i, name in enumerate(names):
        if name in kwargs:
            sig[name], consts[(i,)] = "constexpr", kwargs[name]
        else:
            a = args[i]
            sig[name] = (
                ("*" + TYPES[a.dtype])
                if isinstance(a, torch.Tensor)
                else ("fp32" if isinstance(a, float) else "i64" if abs(a) >= 2**31 else "i32")
            )
    opts = {k: kwargs[k] for k in OPTIONS if k in kwargs}
    key = (self.fn.__name__, tuple(sig.items()), tuple(map(str, consts.items())), tuple(opts.items()))
    launches[key] = (self, sig, consts, opts)


def calls(dtype: torch.dtype) -> None:
    """Every op once, at small shapes with V4 head sizes."""
    g = torch.Generator().manual_seed(0)

    def r(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt)

    tb = triton_backend
    tb.indexer_topk(r(4, 100, dt=torch.float32), 16)
    # the CSA layer's attention indices: the window's columns, then the top-k entries' page-store rows
    table, seq = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]), torch.tensor([0, 0, 1, 1])
    tb.indexer_topk(r(4, 100, dt=torch.float32), 16, (table, seq, 32, 700), torch.randint(-1, 9, (4, 128)))
    tb.moe_route(r(8, 256), r(16, 256), r(16, dt=torch.float32), 6, 1.5, None, None)
    tb.moe_route(r(8, 256), r(16, 256), None, 6, 1.5, torch.randint(0, 16, (50, 6), dtype=torch.int32), seq)
    tb.copy_rows(r(9, 512), torch.tensor([3, 5]), r(4, 512), torch.tensor([0, 2]))
    tb.copy_rows(
        torch.zeros(9, 584, dtype=torch.uint8), torch.tensor([3, 5]), torch.zeros(4, 584, dtype=torch.uint8), seq[:2]
    )
    tb.moe_experts(
        r(8, 256),
        torch.randint(-1, 4, (8, 6)),
        r(8, 6, dt=torch.float32),
        r(4, 128, 256),
        r(4, 128, 256),
        r(4, 256, 128),
        10.0,
    )
    shared = (r(128, 256), r(128, 256), r(256, 128), 10.0)  # the shared expert: DENSE up and down, with `add`
    tb.dense_expert(r(8, 256), *shared)
    tb.dense_expert(r(8, 256), *shared, r(8, 256))
    # the paged ops: plain rows of the activation dtype, and packed deployed rows (uint8)
    for packed in (False, True):
        rows = (lambda n, d: kv_format.pack_main(r(n, d, dt=torch.float32), 64)) if packed else r
        keys = kv_format.pack_index(r(6 * 32, 128, dt=torch.float32)) if packed else r(6 * 32, 128)
        tb.paged_sparse_attention(
            r(4, 64, 512),
            rows(3, 512),
            rows(64, 512),
            rows(96, 512),
            torch.randint(-1, 163, (4, 40), dtype=torch.int32 if packed else torch.int64),  # HCA: int64 metadata
            r(64, dt=torch.float32),
            0.04,
            64,
            (torch.arange(4), r(32, dt=torch.float32)),  # the output rotated back, as the model calls it
            RowNorm(None, 1e-6, (torch.arange(4), r(32, dt=torch.float32))),  # queries normalised + roped
        )
        tb.paged_indexer_scores(
            r(4, 64, 128),
            r(4, 64),
            keys.unflatten(0, (6, 32)),
            torch.tensor([[0, 1, -1], [2, 3, 4]]),
            torch.tensor([0, 0, 1, 1]),
            torch.tensor([1, 40, 0, 96]),
        )
    f32 = torch.float32
    tb.gated_pool_indexed(
        r(5, 1024, dt=f32),
        r(5, 1024, dt=f32),
        r(16, 1024, dt=f32),
        r(16, 1024, dt=f32),
        torch.randint(-1, 21, (3, 8)),
        True,
        r(4, 1024, dt=f32),
        torch.bfloat16,  # entries stored in the model dtype
    )
    tb.gated_pool_indexed(
        r(5, 512, dt=f32),
        r(5, 512, dt=f32),
        r(256, 512, dt=f32),
        r(256, 512, dt=f32),
        torch.randint(-1, 261, (2, 128)),
        False,
        r(128, 512, dt=f32),
        f32,
    )
    # deployed precision: packed MXFP4 experts; FP8 GEMM at a decode and a prefill batch
    packed = [
        torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)
        for shape in ((4, 128, 128), (4, 128, 128), (4, 256, 64))
    ]
    scales = tuple(
        torch.full(shape, 120, dtype=torch.uint8).view(torch.float8_e8m0fnu)
        for shape in ((4, 128, 8), (4, 128, 8), (4, 256, 4))
    )
    tb.moe_experts(r(8, 256), torch.randint(-1, 4, (8, 6)), r(8, 6, dt=torch.float32), *packed, 10.0, scales)
    w8 = torch.randn(200, 300, generator=g).to(torch.float8_e4m3fn)
    s8 = torch.full((2, 3), 120, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    tb.fp8_linear(r(8, 300), w8, s8)  # decode, split K (fp32 partials)
    tb.fp8_linear(r(8, 128), w8[:, :128].contiguous(), s8[:, :1].contiguous())  # decode, one K block
    tb.fp8_linear(r(100, 300), w8, s8)
    tb.fp8_linear(r(8, 300), w8, s8, False)  # weight-only variant (bench comparison)
    tb.fp8_linear(r(100, 300), w8, s8, False)
    tb.hc_split_sinkhorn(r(8, 24, dt=torch.float32), r(3, dt=torch.float32), r(24, dt=torch.float32), 4, 20, 1e-6)
    tb.hc_pre(r(8, 4, 256), r(8, 4, dt=torch.float32))
    tb.hc_pre(r(8, 4, 4096), r(8, 4, dt=torch.float32), (r(4096, dt=torch.float32), 1e-6))  # + sub-layer norm
    tb.hc_mixes(r(8, 4, 4096), r(24, 4 * 4096, dt=torch.float32), 1e-6)
    tb.hc_mixes_sinkhorn(
        r(8, 4, 4096),
        r(24, 4 * 4096, dt=torch.float32),
        1e-6,
        r(3, dt=torch.float32),
        r(24, dt=torch.float32),
        4,
        20,
        1e-6,
    )
    tb.hc_post(r(8, 256), r(8, 4, 256), r(8, 4, dt=torch.float32), r(8, 4, 4, dt=torch.float32))
    tb.rms_norm(r(8, 512), r(512, dt=torch.float32), 1e-6, dtype)  # block / KV norm, with gain
    tb.rms_norm(r(8, 4096), None, 1e-6, torch.float32)  # mHC pre-norm
    rot = (torch.arange(8), r(32, dt=torch.float32))
    tb.rms_norm(r(8, 512), r(512, dt=torch.float32), 1e-6, dtype, rot)  # KV / entry norm + RoPE
    tb.rms_norm(r(8, 64, 512), None, 1e-6, dtype, rot)  # per-head query norm + RoPE
    # a GPU splits the reductions of small batches (launch.split_reduction; one split on CPU tensors):
    # attention rows (flash-decoding + merge), the router's and mHC mixes' inputs (partials + sum)
    split_modules = (paged, routing, sinkhorn)
    saved = [m.split_reduction for m in split_modules]
    for m in split_modules:
        m.split_reduction = lambda _p, size, block, _d: triton.cdiv(triton.cdiv(size, 2), block) * block
    try:
        tb.paged_sparse_attention(
            r(1, 64, 512),
            kv_format.pack_main(r(1, 512, dt=torch.float32), 64),
            kv_format.pack_main(r(64, 512, dt=torch.float32), 64),
            kv_format.pack_main(r(96, 512, dt=torch.float32), 64),
            torch.randint(-1, 161, (1, 64), dtype=torch.int32),
            r(64, dt=torch.float32),
            0.04,
            64,
            (torch.arange(1), r(32, dt=torch.float32)),
            RowNorm(None, 1e-6, (torch.arange(1), r(32, dt=torch.float32))),
        )
        tb.moe_route(r(2, 4096), r(256, 4096), r(256, dt=torch.float32), 8, 2.5, None, None)
        tb.hc_mixes(r(2, 4, 4096), r(24, 4 * 4096, dt=torch.float32), 1e-6)
        tb.hc_mixes_sinkhorn(
            r(2, 4, 4096),
            r(24, 4 * 4096, dt=torch.float32),
            1e-6,
            r(3, dt=torch.float32),
            r(24, dt=torch.float32),
            4,
            20,
            1e-6,
        )
    finally:
        for m, fn in zip(split_modules, saved, strict=True):
            m.split_reduction = fn
    tb.rope(r(8, 64, 512), torch.arange(8), r(32, dt=torch.float32), False, False)
    tb.rope(r(8, 64, 128), torch.arange(8), r(32, dt=torch.float32), False, True)  # indexer query, rotated
    tb.pack_main(r(8, 512), 64)
    tb.pack_index(r(8, 128))
    into = torch.arange(8) * 2  # straight into store rows
    tb.pack_main(r(8, 512), 64, torch.zeros(16, kv_format.main_bytes(512, 64), dtype=torch.uint8), into)
    tb.pack_index(r(8, 128), torch.zeros(16, kv_format.index_bytes(128), dtype=torch.uint8), into)
    tb.pack_index(r(8, 128), torch.zeros(16, kv_format.index_bytes(128), dtype=torch.uint8), into, True)  # rotated
    rotary = (torch.arange(8), r(32, dt=torch.float32))  # the KV / compressed-entry norms, packed with their rows
    main_store = torch.zeros(16, kv_format.main_bytes(512, 64), dtype=torch.uint8)
    tb.pack_main(r(8, 512), 64, main_store, into, RowNorm(r(512, dt=torch.float32), 1e-6, rotary))
    index_store = torch.zeros(16, kv_format.index_bytes(128), dtype=torch.uint8)
    tb.pack_index(r(8, 128), index_store, into, True, RowNorm(r(128, dt=torch.float32), 1e-6, rotary))


def main() -> int:
    JITFunction.run = record
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        calls(dtype)
    failed = 0
    for fn, sig, consts, opts in launches.values():
        name = fn.fn.__name__
        try:
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=TARGET, options=opts)
            if k.metadata.shared > SHARED_LIMIT:  # checked when the kernel loads on a GPU, not by ptxas
                raise RuntimeError(f"needs {k.metadata.shared} B of shared memory, sm_90 has {SHARED_LIMIT}")
            print(f"ok    {name} {sorted(set(t for t in sig.values() if t.startswith('*')))} smem {k.metadata.shared}")
        except Exception as e:  # report every kernel, then fail
            failed += 1
            print(f"FAIL  {name} {sig}\n      {type(e).__name__}: {str(e)[:2000]}")
    print(
        f"{len(launches) - failed}/{len(launches)} kernel variants compile for sm_90 with triton {triton.__version__}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
