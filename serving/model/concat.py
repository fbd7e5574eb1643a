"""Projections that read the same input, run as one GEMM over their weights joined by rows.

The layers keep their parameters under the official names (checkpoints load as they are); the first
call re-points them at row slices of one joined tensor, so there is no second copy. If anything
replaces a parameter later (loading with assign, `.to()`), the next call joins them again.

Plain weights join whatever their sizes; FP8 weights join with their block scales when every part
fills whole 128-row scale blocks (then the rows of one scale block belong to one part). Layers that
cannot join the run before them (another format, unaligned FP8) run on their own.
"""

from __future__ import annotations

import torch
from torch import nn

from v4d.serving.model.linear import BLOCK, matmul


def _kind(layer: nn.Linear) -> str | None:
    """Layers of one kind join; None: on its own."""
    fmt = getattr(layer, "fmt", None)
    if fmt is None:
        return "plain"
    return "fp8" if fmt == "fp8" and layer.out_features % BLOCK == 0 else None


class _Run:
    """Consecutive layers of one kind, joined by rows (weights, and block scales for FP8)."""

    def __init__(self, layers: list[nn.Linear], kind: str | None):
        self.layers, self.kind = layers, kind
        self.names = ("weight", "scale") if kind == "fp8" else ("weight",)
        self._joined: list[torch.Tensor] = []
        self._ptrs: list[int] = []

    def tensors(self) -> list[torch.Tensor]:
        """The joined parameters (weight, then scale for FP8), in the layers' order."""
        ptrs = [getattr(layer, name).data_ptr() for name in self.names for layer in self.layers]
        if ptrs != self._ptrs:
            # a normal (not inference) tensor, so a later load_state_dict can still copy into it
            with torch.inference_mode(False), torch.no_grad():
                self._joined = [self._join(name) for name in self.names]
            self._ptrs = [getattr(layer, name).data_ptr() for name in self.names for layer in self.layers]
        return self._joined

    def _join(self, name: str) -> torch.Tensor:
        parts = [getattr(layer, name).detach() for layer in self.layers]
        dtype = parts[0].dtype
        # byte views: cat has no kernels for every 8-bit float format
        byte = dtype.itemsize == 1
        joined = torch.cat([p.view(torch.uint8) for p in parts]).view(dtype) if byte else torch.cat(parts)
        for layer, part in zip(self.layers, joined.split([p.shape[0] for p in parts]), strict=True):
            setattr(layer, name, nn.Parameter(part, requires_grad=False))
        return joined

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if len(self.layers) == 1:
            return [self.layers[0](x)]
        y = matmul(x, *self.tensors())
        return list(y.split([layer.out_features for layer in self.layers], dim=-1))


class RowConcat:
    """Layers that read one input: `weight()` is their joined plain weight (one GEMM the caller runs,
    e.g. in fp32); calling it runs each run of joinable layers as one GEMM and returns every layer's
    output (views of the run's output), in order."""

    def __init__(self, *layers: nn.Linear):
        self.runs: list[_Run] = []
        for layer in layers:
            kind = _kind(layer)
            if self.runs and kind is not None and self.runs[-1].kind == kind:
                self.runs[-1].layers.append(layer)
            else:
                self.runs.append(_Run([layer], kind))

    def weight(self) -> torch.Tensor:
        """[sum of out_features, in_features]: the layers' plain weights, in order."""
        if len(self.runs) != 1 or self.runs[0].kind != "plain":
            raise ValueError("RowConcat.weight: needs plain weights only")
        return self.runs[0].tensors()[0]

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [y for run in self.runs for y in run(x)]
