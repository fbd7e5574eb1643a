"""Kernel tests: the Triton kernels against the torch references.

On the CPU (default) the kernels run through the Triton interpreter. TRITON_INTERPRET is read when
`@triton.jit` runs (kernel module import), so it is set here, before any test imports a kernel. It
does not change other test directories: `v4d.kernels.ops` only takes the Triton path for CPU
tensors when V4D_KERNELS=triton. With V4D_TEST_DEVICE=cuda (scripts/gpu-check.sh) the same tests
run the compiled kernels on the GPU. bf16 inputs pass in the interpreter too (whose bf16 arithmetic
is broken) because every kernel converts to fp32 right after loading and dots fp32 operands there.
Inputs are made on the CPU and moved by the `kops` wrapper; results come back to the CPU.
"""

import os

import pytest
import torch

DEVICE = torch.device(os.environ.get("V4D_TEST_DEVICE", "cpu"))
if DEVICE.type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=DTYPES, ids=[str(d).removeprefix("torch.") for d in DTYPES])
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


class OnDevice:
    """`ops` with tensor arguments moved to DEVICE and results moved back to the CPU."""

    def __init__(self, ops):
        self._ops = ops
        self.device = DEVICE

    def __getattr__(self, name: str):
        fn = getattr(self._ops, name)

        def move(a):
            if isinstance(a, tuple):  # NamedTuples (ops.RowNorm) keep their type
                moved = [move(b) for b in a]
                return type(a)(*moved) if hasattr(a, "_fields") else tuple(moved)
            return a.to(DEVICE) if isinstance(a, torch.Tensor) else a

        def call(*args):
            out = fn(*[move(a) for a in args])
            return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()

        return call


@pytest.fixture
def kops(monkeypatch: pytest.MonkeyPatch) -> OnDevice:
    """`v4d.kernels.ops` forced onto the Triton path (the interpreter for CPU tensors)."""
    from v4d.kernels import ops, triton_backend

    monkeypatch.setenv("V4D_KERNELS", "triton")
    assert ops.backend(DEVICE) is triton_backend
    return OnDevice(ops)


def _tol(dtype: torch.dtype) -> dict:
    if dtype == torch.float32:
        return {"atol": 1e-5, "rtol": 1e-5}
    if dtype == torch.float16:
        return {"atol": 3e-3, "rtol": 3e-3}
    return {"atol": 3e-2, "rtol": 3e-2}


@pytest.fixture
def tol():
    """assert_close tolerances for a dtype (fixtures, not imports: several test dirs have a conftest)."""
    return _tol


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def split_into(monkeypatch: pytest.MonkeyPatch):
    """force(module, n): the module's reductions split as a GPU splits them for small batches
    (`launch.split_reduction`), in about n splits of whole blocks, on any device."""

    def force(module, n: int) -> None:
        def length(_programs: int, size: int, block: int, _device) -> int:
            per_split = -(-size // n)  # ceil(size / n), rounded up to whole blocks
            return -(-per_split // block) * block

        monkeypatch.setattr(module, "split_reduction", length)

    return force
