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
