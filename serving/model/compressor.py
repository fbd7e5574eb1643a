"""Token-level KV compressor (deepseek-v4.md §2.1 step 3): gated pooling of `ratio` tokens per entry.

Values C_j = wkv x_j and gate logits Z_j = wgate x_j + ape[j mod ratio] (fp32). HCA pools each block
of `ratio` tokens; CSA (ratio 4) is overlapped: entry i pools 8 candidates, the previous block
through the first `head_dim` channels ("b" branch) and its own block through the second ("a"),
with one softmax per channel over all 8. Each finished entry gets RMSNorm and RoPE at its anchor
position ratio * i. Positions of a block not yet closed wait in the slot's tail state, so any split
of a sequence into chunks produces the same entries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from v4d.kernels import ops
from v4d.serving.model.cache import CompressorState
from v4d.serving.model.norm import RMSNorm
from v4d.serving.model.rope import Rope


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
        x = x.float()  # compression runs in fp32 whatever the model dtype
        return F.linear(x, self.wkv.weight.float()), F.linear(x, self.wgate.weight.float())

    def step(self, kv: torch.Tensor, score: torch.Tensor, start: int, state: CompressorState,
             slot: int, out_dtype: torch.dtype) -> tuple[torch.Tensor, int]:
        """Feed one sequence's chunk (positions start..start+T-1); update the tail state of `slot`.

        Returns (entries [nb, head_dim] of the blocks closed by this chunk, index of the first).
        """
        m, c = self.ratio, self.head_dim
        end = start + kv.shape[0]
        pos = torch.arange(start, end, device=kv.device)
        score = score + self.ape[pos % m]
        if start == 0:  # a new sequence in this slot: the "previous block" of entry 0 is padding
            state.kv[slot].zero_()
            state.score[slot].fill_(float("-inf"))
        first = start // m
        tail = m if self.overlap else 0  # rows of the state that hold the open block
        r0 = start - first * m
        seq_kv = torch.cat([state.kv[slot, tail : tail + r0], kv])
        seq_score = torch.cat([state.score[slot, tail : tail + r0], score])
        nb = end // m - first
        entries = kv.new_zeros(0, c, dtype=out_dtype)
        if nb:
            cur_kv = seq_kv[: nb * m].view(nb, m, -1)
            cur_score = seq_score[: nb * m].view(nb, m, -1)
            if self.overlap:
                prev_kv = torch.cat([state.kv[slot, None, :m], cur_kv[:-1]])
                prev_score = torch.cat([state.score[slot, None, :m], cur_score[:-1]])
                values = torch.cat([prev_kv[..., :c], cur_kv[..., c:]], dim=1)
                gates = torch.cat([prev_score[..., :c], cur_score[..., c:]], dim=1)
                state.kv[slot, :m] = cur_kv[-1]
                state.score[slot, :m] = cur_score[-1]
            else:
                values, gates = cur_kv, cur_score
            pooled = self.norm(ops.gated_pool(values, gates).to(out_dtype))
            anchors = (first + torch.arange(nb, device=kv.device)) * m
            entries = self.rope(pooled, anchors)
        rest = seq_kv.shape[0] - nb * m
        state.kv[slot, tail : tail + rest] = seq_kv[nb * m :]
        state.score[slot, tail : tail + rest] = seq_score[nb * m :]
        return entries, first
