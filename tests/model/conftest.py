"""Shared random-weight models for the model tests (built once per session, fp32, one thread)."""

from __future__ import annotations

import os

import pytest
import torch
from helpers.models import build

from v4d.serving.model.model import Transformer

# Small ops on a shared 2-core machine run far faster single-threaded.
torch.set_num_threads(1)
# The launch estimate (opcount.decode_step_launches) runs Triton's interpreter, which must be on before
# anything imports triton (torch's compiler does); CPU tensors still take the references unless
# V4D_KERNELS=triton.
if os.environ.get("V4D_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny() -> Transformer:
    return build("v4-tiny")


@pytest.fixture(scope="session")
def tiny_fast() -> Transformer:
    return build("v4-tiny-fast")


@pytest.fixture(scope="session")
def tokens() -> torch.Tensor:
    return torch.randint(0, 1024, (420,), generator=torch.Generator().manual_seed(1))
