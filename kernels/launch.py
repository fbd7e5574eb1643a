"""Launch-time choices shared by the Triton kernels: interpreter or GPU, dot precision, block sizes."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def interpreting() -> bool:
    """True when the kernels run through the Triton interpreter (CPU tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_dtype(t: torch.Tensor) -> tl.dtype:
    """Operand type of `tl.dot`: the 16-bit input type on a GPU (tensor cores), fp32 otherwise.

    Everything else is computed in fp32 after loading. The interpreter always gets fp32 operands,
    since its bf16 arithmetic is broken (docs/toolchain.md §1.2); fp32 dots use IEEE precision (no TF32)
    so fp32 results match the reference closely.
    """
    if interpreting():
        return tl.float32
    return _DOT_DTYPES.get(t.dtype, tl.float32)


def pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


MAX_SPLITS = 16


def split_reduction(programs: int, length: int, block: int, device: torch.device) -> int:
    """Whole blocks of `block` per split of a reduction of `length` when its other grid dimensions
    give only `programs` programs: enough splits for two programs per multiprocessor (a decode step of
    a few tokens otherwise walks the whole reduction in one or a few programs while the others idle),
    at most MAX_SPLITS (the kernel that sums the splits walks them in turn), one off CUDA (the
    interpreter, where each program costs time). Returns the split's length."""
    splits = 1
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = max(1, min(triton.cdiv(length, block), triton.cdiv(2 * sms, programs), MAX_SPLITS))
    return triton.cdiv(triton.cdiv(length, splits), block) * block
