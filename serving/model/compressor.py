"""Token-level KV compressor (docs/deepseek-v4.md §2.1 step 3): gated pooling of `ratio` tokens per entry.

Values C_j = wkv x_j and gate logits Z_j = wgate x_j + ape[j mod ratio] (fp32; the bias is added as
the pool reads a candidate, so the tail rings hold wgate x_j). HCA pools each block
of `ratio` tokens; CSA (ratio 4) is overlapped: entry i pools 8 candidates, the previous block
through the first `head_dim` channels ("b" branch) and its own block through the second ("a"),
with one softmax per channel over all 8. Each finished entry gets RMSNorm and RoPE at its anchor
position ratio * i, in the launch that stores it. Positions of a block not yet closed wait in the
slot's tail state, so any split of a sequence into chunks produces the same entries. `update`
serves every sequence of a step at once: the step's `Compression` lists each closing entry's
candidate rows (this step's or the tail ring's), so one `gated_pool_indexed` call pools them all.
The projections (`wkv`, `wgate`) run in the owning attention's joined GEMM
(serving/model/concat.py) in fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from v4d.kernels import ops
from v4d.serving.model.cache import CompressorState
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

    def update(
        self, proj: torch.Tensor, comp: Compression, state: CompressorState, out_dtype: torch.dtype
    ) -> tuple[torch.Tensor, ops.RowNorm]:
        """Feed the step's rows (proj [N, 2 * width]: values | unbiased gate logits, fp32): returns the
        pooled entries [E, head_dim] the step closes (in `comp.anchor` order; the pool adds the position
        bias `ape` as it reads a candidate) and the norm + RoPE that finishes them, which the store
        applies as it packs them (`ops.store_rows(norm=)`). The caller then writes the step's rows to
        the tail rings (`LayerCache.tails`: one copy for the layer's compressors)."""
        w = proj.shape[1] // 2
        tail = state.tail.flatten(0, 1)
        pooled = ops.gated_pool_indexed(
            proj[:, :w], proj[:, w:], tail[:, :w], tail[:, w:], comp.idx, self.overlap, self.ape, out_dtype
        )
        return pooled, self.norm.as_row_norm((comp.anchor, self.rope.inv_freq))
