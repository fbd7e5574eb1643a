"""Projections that read the same input, run as one GEMM over their weights joined by rows.

The layers keep their parameters under the official names (checkpoints load as they are); the first
call re-points them at row slices of one joined tensor, so there is no second copy. If anything
replaces a parameter later (loading with assign, `.to()`), the next call joins them again.
"""

from __future__ import annotations

import torch
from torch import nn


class RowConcat:
    def __init__(self, *layers: nn.Linear):
        self.layers = layers
        self.sizes = [layer.out_features for layer in layers]
        self._joined: torch.Tensor | None = None
        self._ptrs: list[int] = []

    def weight(self) -> torch.Tensor:
        """[sum of out_features, in_features]: the layers' weights, in order."""
        if [layer.weight.data_ptr() for layer in self.layers] != self._ptrs:
            # a normal (not inference) tensor, so a later load_state_dict can still copy into it
            with torch.inference_mode(False), torch.no_grad():
                joined = torch.cat([layer.weight.detach() for layer in self.layers])
                for layer, part in zip(self.layers, joined.split(self.sizes), strict=True):
                    layer.weight = nn.Parameter(part, requires_grad=False)
            self._joined, self._ptrs = joined, [layer.weight.data_ptr() for layer in self.layers]
        assert self._joined is not None
        return self._joined
