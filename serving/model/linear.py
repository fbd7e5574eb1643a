"""Linear layers held in the model's precision, declared with the checkpoint's format.

Each constructor names the format the released checkpoint stores its weight in (`fmt`: "fp8" for
block-scaled projections, "fp4" for routed experts, "bf16" otherwise). Under `weights_in("deployed")`
a quantised layer keeps that format in memory, under the checkpoint's parameter names:

    fp8  weight float8_e4m3fn [out, in]  + scale float8_e8m0fnu [ceil(out/128), ceil(in/128)]
    fp4  weight int8 [out, in/2]         + scale float8_e8m0fnu [out, in/32]   (packed MXFP4)

and runs through `ops.fp8_linear` (FP4 layers are routed experts: `ops.moe_experts` reads them
packed). Otherwise the weight is a plain `[out, in]` tensor and `scale` is None. The setting is a
class attribute read at construction, as DeepSeek's inference code sets `Linear.dtype` before it
builds the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from v4d.kernels import ops
from v4d.kernels.quant import FP4_GROUP, dequant_fp4, dequant_fp8

BLOCK = 128


# torch.mm(..., out_dtype=) (16-bit operands, fp32 output) exists from torch 2.9, with a kernel on
# these devices only (opcount.cuda_launches adds "cpu" and computes it there as the upcast would).
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")
MM_OUT_DTYPE_DEVICES = {"cuda"}


def linear_fp32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x W^T in fp32 for the parts computed in fp32 (compressor, router, LM head) without an fp32
    copy of a 16-bit weight each step: on CUDA, x and W in the same 16-bit dtype go through one
    16-bit GEMM with fp32 output (products of 16-bit values are exact in fp32, sums accumulate in
    fp32: the math of the upcast up to summation order); otherwise both are upcast."""
    half = x.dtype == w.dtype and w.dtype in (torch.bfloat16, torch.float16)
    if _MM_OUT_DTYPE and half and x.device.type in MM_OUT_DTYPE_DEVICES:
        return torch.mm(x.reshape(-1, x.shape[-1]), w.t(), out_dtype=torch.float32).view(*x.shape[:-1], -1)
    return F.linear(x.float(), w.float())


def matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T in x's dtype: an FP8 weight with its block `scale` through `ops.fp8_linear`, else a plain
    weight (cast to x's dtype). `Linear` and the joined projections (concat.py) run their GEMMs here."""
    if scale is not None:
        return ops.fp8_linear(x.flatten(0, -2), weight, scale).unflatten(0, x.shape[:-1])
    return F.linear(x, weight if weight.dtype == x.dtype else weight.to(x.dtype))


class Linear(nn.Linear):
    """y = x W^T without bias; see the module docstring for the stored forms."""

    quantised: ClassVar[bool] = False  # set by `weights_in`

    def __init__(self, in_features: int, out_features: int, fmt: str = "bf16", dtype: torch.dtype | None = None):
        if fmt not in ("fp8", "fp4", "bf16"):
            raise ValueError(f"Linear: fmt must be fp8, fp4 or bf16, got {fmt!r}")
        self.fmt = fmt if Linear.quantised and fmt != "bf16" else None
        if self.fmt is None:
            super().__init__(in_features, out_features, bias=False, dtype=dtype)
            self.register_parameter("scale", None)
            return
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.register_parameter("bias", None)
        if self.fmt == "fp8":
            w = torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn)
            s = torch.empty(-(-out_features // BLOCK), -(-in_features // BLOCK), dtype=torch.float8_e8m0fnu)
        else:
            if in_features % FP4_GROUP:
                raise ValueError(f"Linear: an fp4 layer needs in_features divisible by {FP4_GROUP}, got {in_features}")
            w = torch.empty(out_features, in_features // 2, dtype=torch.int8)
            s = torch.empty(out_features, in_features // FP4_GROUP, dtype=torch.float8_e8m0fnu)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.scale = nn.Parameter(s, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt == "fp4":
            return F.linear(x, self.dense_weight(x.dtype))
        return matmul(x, self.weight, self.scale)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as a plain [out, in] tensor of `dtype` (decoded when quantised)."""
        if self.fmt == "fp8":
            return dequant_fp8(self.weight, self.scale).to(dtype)
        if self.fmt == "fp4":
            return dequant_fp4(self.weight, self.scale).to(dtype)
        return self.weight if self.weight.dtype == dtype else self.weight.to(dtype)

    def grouped(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """x [T, G, in/G] -> [T, G, out/G]: group g multiplies rows g*out/G.. with its own inputs.

        FP8 weights whose group rows fill whole 128-row scale blocks run one FP8 GEMM per group;
        others multiply the decoded weight."""
        rows = self.out_features // groups
        if self.fmt == "fp8" and rows % BLOCK == 0:
            nb = rows // BLOCK
            return torch.stack(
                [
                    ops.fp8_linear(x[:, g], self.weight[g * rows : (g + 1) * rows], self.scale[g * nb : (g + 1) * nb])
                    for g in range(groups)
                ],
                dim=1,
            )
        # one batched GEMM over the groups, written token-major: the caller's flatten is then a view
        out = torch.empty(x.shape[0], groups, rows, dtype=x.dtype, device=x.device)
        w = self.dense_weight(x.dtype).view(groups, rows, -1)
        torch.bmm(x.transpose(0, 1), w.transpose(1, 2), out=out.transpose(0, 1))
        return out


@contextmanager
def weights_in(precision: str) -> Iterator[None]:
    """Build `Linear`s for `precision` ("deployed" keeps FP8/FP4; "bf16"/"fp32" plain) meanwhile."""
    before = Linear.quantised
    Linear.quantised = precision == "deployed"
    try:
        yield
    finally:
        Linear.quantised = before
