"""Mixture of experts (docs/deepseek-v4.md §5): sqrt-softplus router, hash routing, shared expert.

Routed experts run behind `ExpertBackend` (tokens + chosen ids + weights in, combined output out),
so the serving engine can send them to remote shards and kernels can swap in a grouped GEMM.
`LocalExperts` runs the model's own experts in process.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
from torch import nn

from v4d.kernels import ops
from v4d.kernels.reference import swiglu
from v4d.serving.config import ModelConfig
from v4d.serving.model.linear import Linear


class ExpertBackend(Protocol):
    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, d], ids [T, k] (-1 = skip), weights [T, k] -> sum_j weights * expert_ids(x): [T, d]."""
        ...


class Gate(nn.Module):
    """Router. Scores s = sqrt(softplus(x . e)) in fp32; the bias (non-hash layers) only shifts the
    choice; hash layers take the experts from `tid2eid[token id]`. Weights are the unbiased scores of
    the chosen experts, normalised to sum 1, times `routed_scaling_factor`."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.topk, self.scale = cfg.num_experts_per_tok, cfg.routed_scaling_factor
        self.hash = cfg.is_hash_layer(layer)
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size))
        if self.hash:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, self.topk, dtype=torch.int32))
            self.bias = None
        else:
            self.bias = nn.Parameter(torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (weights [T, k] fp32, ids [T, k] int64)."""
        if self.hash:
            return ops.moe_route(x, self.weight, None, self.topk, self.scale, self.tid2eid, input_ids)
        return ops.moe_route(x, self.weight, self.bias, self.topk, self.scale)


class Expert(nn.Module):
    """SwiGLU FFN: w2(silu(min(w1 x, lim)) * clamp(w3 x, -lim, lim)); a limit of 0 disables the clamp.
    `fmt`: the checkpoint's format of its weights (routed "fp4", shared "fp8")."""

    def __init__(self, dim: int, inter: int, fmt: str):
        super().__init__()
        self.w1 = Linear(dim, inter, fmt)
        self.w2 = Linear(inter, dim, fmt)
        self.w3 = Linear(dim, inter, fmt)

    def forward(self, x: torch.Tensor, limit: float, add: torch.Tensor | None = None) -> torch.Tensor:
        """The expert's output, or `add` plus it (x's dtype), in the expert's last launch where it can."""
        if self.w1.fmt == "fp8":  # three block-scaled GEMMs
            y = self.w2(swiglu(self.w1(x).float(), self.w3(x).float(), limit).to(x.dtype))
            return y if add is None else (add + y).to(x.dtype)
        return ops.dense_expert(x, self.w1.weight, self.w3.weight, self.w2.weight, limit, add)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, with_experts: bool = True):
        super().__init__()
        self.layer, self.swiglu_limit = layer, cfg.swiglu_limit
        self.gate = Gate(cfg, layer)
        n = cfg.n_routed_experts if with_experts else 0
        self.experts = nn.ModuleList(Expert(cfg.hidden_size, cfg.moe_intermediate_size, "fp4") for _ in range(n))
        self.shared_experts = Expert(cfg.hidden_size, cfg.moe_intermediate_size, "fp8")

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor, backend: ExpertBackend) -> torch.Tensor:
        weights, ids = self.gate(x, input_ids)
        # The shared expert is clamped like the routed ones (docs/deepseek-v4.md §5; official Expert(swiglu_limit=)).
        start = getattr(backend, "start", None)
        if start is None:  # in process: it adds the routed output to its own in its last launch
            return self.shared_experts(x, self.swiglu_limit, add=backend(self.layer, x, ids, weights))
        finish = start(self.layer, x, ids, weights)  # remote: computed while the routed rows are away
        try:
            shared = self.shared_experts(x, self.swiglu_limit)
        except BaseException:
            finish()  # collect the calls in flight: a channel holds its tag until then
            raise
        return (finish() + shared).to(x.dtype)  # the sum the fused add makes


class LocalExperts:
    """In-process backend over the model's own `MoE.experts`.

    The grouped op wants stacked [E, I, d] weights. To avoid a copy per call, each expert's
    parameters are re-pointed at slices of one stacked tensor; `load_state_dict` copies into them
    in place. If anything replaces the parameters (assign-loading, `.to()`), the stack is rebuilt.
    """

    def __init__(self, moes: Mapping[int, MoE]):
        self.moes = dict(moes)
        self._stacks: dict[int, tuple[list[int], tuple[torch.Tensor, ...]]] = {}

    def _fields(self, layer: int) -> list[tuple[str, str]]:
        """(linear, parameter) pairs stacked: weights, and the MXFP4 scales of packed experts."""
        experts = self.moes[layer].experts
        packed = len(experts) and experts[0].w1.scale is not None
        return [(lin, p) for p in (("weight", "scale") if packed else ("weight",)) for lin in ("w1", "w3", "w2")]

    def _params(self, layer: int) -> list[nn.Parameter]:
        return [getattr(getattr(e, lin), p) for lin, p in self._fields(layer) for e in self.moes[layer].experts]

    def stacked(self, layer: int) -> tuple[torch.Tensor, ...]:
        """(w1, w3, w2) stacked over experts, plus (s1, s3, s2) when they are packed MXFP4."""
        params = self._params(layer)
        ptrs = [p.data_ptr() for p in params]
        cached = self._stacks.get(layer)
        if cached is not None and cached[0] == ptrs:
            return cached[1]
        experts = self.moes[layer].experts
        if not len(experts):
            raise ValueError(f"layer {layer}: this model was built without routed experts (with_experts=False)")
        stacks = []
        # Normal (not inference) tensors, so a later load_state_dict can still copy into them.
        with torch.inference_mode(False), torch.no_grad():
            for lin, p in self._fields(layer):
                stack = torch.stack([getattr(getattr(e, lin), p).detach() for e in experts])
                for e, view in zip(experts, stack, strict=True):
                    setattr(getattr(e, lin), p, nn.Parameter(view, requires_grad=False))
                stacks.append(stack)
        self._stacks[layer] = ([p.data_ptr() for p in self._params(layer)], tuple(stacks))
        return self._stacks[layer][1]

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        w1, w3, w2, *scales = self.stacked(layer)
        return ops.moe_experts(x, ids, weights, w1, w3, w2, self.moes[layer].swiglu_limit, tuple(scales) or None)
