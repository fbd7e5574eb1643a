"""Token-level KV compressor (docs/deepseek-v4.md §2.1 step 3): gated pooling of `ratio` tokens per entry.

Values C_j = wkv x_j and gate logits Z_j = wgate x_j + ape[j mod ratio] (fp32). HCA pools each block
of `ratio` tokens; CSA (ratio 4) is overlapped: entry i pools 8 candidates, the previous block
through the first `head_dim` channels ("b" branch) and its own block through the second ("a"),
with one softmax per channel over all 8. Each finished entry gets RMSNorm and RoPE at its anchor
position ratio * i. Positions of a block not yet closed wait in the slot's tail state, so any split
of a sequence into chunks produces the same entries. `update` serves every sequence of a step at
once: the step's `Compression` lists each closing entry's candidate rows (this step's or the tail
ring's), so one `gated_pool_indexed` call pools them all.
"""

from __future__ import annotations

import torch
from torch import nn

from v4d.kernels import ops
from v4d.serving.model.cache import CompressorState
from v4d.serving.model.linear import linear_fp32
from v4d.serving.model.norm import RMSNorm
from v4d.serving.model.rope import Rope
from v4d.serving.model.step import Compression


class Compressor(nn.Module):
    def __init__(self, dim: int, ratio: int, head_dim: int, rope: Rope, eps: float):
        super().__init__()
        self.ratio, self.head_dim, self.overlap = ratio, head_dim, ratio == 4
        width = (1 + self.overlap) * head_dim
        self.ape = nn.Parameter(torch.zeros(ratio, width, dtype=torch.float32))
        self.wkv = nn.Linear(dim, width, bias=False, dtype=torch.float32)
        self.wgate = nn.Linear(dim, width, bias=False, dtype=torch.float32)
        self.norm = RMSNorm(head_dim, eps)
        self.rope = rope

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Values and unbiased gate logits of every token of the batch, in fp32: [N, width] each."""
        return linear_fp32(x, self.wkv.weight), linear_fp32(x, self.wgate.weight)  # fp32 whatever the model dtype

    def update(
        self,
        kv: torch.Tensor,
        score: torch.Tensor,
        pos: torch.Tensor,
        comp: Compression,
        state: CompressorState,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """Feed the step's rows (projections from `project`, positions `pos`): returns the entries
        [E, head_dim] the step closes (in `comp.entry` order) and updates the tail rings."""
        score = score + self.ape[pos % self.ratio]
        tail_kv, tail_score = state.kv.flatten(0, 1), state.score.flatten(0, 1)
        pooled = ops.gated_pool_indexed(kv, score, tail_kv, tail_score, comp.idx, self.overlap)
        entries = self.rope(self.norm(pooled.to(out_dtype)), comp.entry * self.ratio)
        tail_kv[comp.state_dst] = kv[comp.state_src]
        tail_score[comp.state_dst] = score[comp.state_src]
        return entries
