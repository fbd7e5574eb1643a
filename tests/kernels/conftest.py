"""Kernel tests run the Triton kernels on the CPU through the Triton interpreter.

TRITON_INTERPRET is read when `@triton.jit` runs (kernel module import), so it is set here, before
any test module imports a kernel. It does not change other test directories: `v4d.kernels.ops`
only uses Triton for CPU tensors when V4D_KERNELS=triton.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(params=[torch.float32, torch.float16], ids=["fp32", "fp16"])
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def kops(monkeypatch: pytest.MonkeyPatch):
    """`v4d.kernels.ops` forced onto the Triton path (the interpreter, for these CPU tensors)."""
    from v4d.kernels import ops, triton_backend

    monkeypatch.setenv("V4D_KERNELS", "triton")
    assert ops.backend(torch.device("cpu")) is triton_backend
    return ops


def tol(dtype: torch.dtype) -> dict:
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-3, "rtol": 3e-3}
