"""Launch-time choices shared by the Triton kernels: interpreter or GPU, dot precision, block sizes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

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
_gpu_sms: int | None = None  # set by `as_on_gpu`


@contextmanager
def as_on_gpu(sms: int = 132) -> Iterator[None]:
    """Meanwhile the launchers take a GPU's launch decisions (reduction splits, split-K, no
    interpreter-only reads) for tensors off CUDA, as on a device with `sms` multiprocessors (an
    H200 has 132): the interpreter then launches what CUDA would (serving/model/opcount.py)."""
    global _gpu_sms
    before, _gpu_sms = _gpu_sms, sms
    try:
        yield
    finally:
        _gpu_sms = before


def gpu_sms(device: torch.device) -> int | None:
    """Multiprocessors the launch decisions assume: the device's on CUDA, `as_on_gpu`'s elsewhere,
    None off a GPU (the interpreter's own choices)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _gpu_sms


def split_reduction(programs: int, length: int, block: int, device: torch.device) -> int:
    """Whole blocks of `block` per split of a reduction of `length` when its other grid dimensions
    give only `programs` programs: enough splits for two programs per multiprocessor (a decode step of
    a few tokens otherwise walks the whole reduction in one or a few programs while the others idle),
    at most MAX_SPLITS (the kernel that sums the splits walks them in turn), one off CUDA (the
    interpreter, where each program costs time, unless `as_on_gpu`). Returns the split's length."""
    splits = 1
    if sms := gpu_sms(device):
        splits = max(1, min(triton.cdiv(length, block), triton.cdiv(2 * sms, programs), MAX_SPLITS))
    return triton.cdiv(triton.cdiv(length, splits), block) * block
