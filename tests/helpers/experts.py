"""Random routed experts of v4-tiny in the official tensor names, and their sum computed in one place:
the reference the expert transports (in-process shards, direct channels) are checked against."""

import torch

from v4d.kernels import ops
from v4d.serving.config import TINY
from v4d.serving.experts import expert_prefix

CFG = TINY
E, D, INTER = CFG.n_routed_experts, CFG.hidden_size, CFG.moe_intermediate_size


def expert_tensors(layers: int) -> dict[str, torch.Tensor]:
    """w1/w3/w2 of every routed expert of MoE layers 0..layers-1, fan-in scaled."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for layer in range(layers):
        for e in range(E):
            p = f"{expert_prefix(CFG, layer)}.ffn.experts.{e}"
            out[f"{p}.w1.weight"] = torch.randn(INTER, D, generator=g) / D**0.5
            out[f"{p}.w3.weight"] = torch.randn(INTER, D, generator=g) / D**0.5
            out[f"{p}.w2.weight"] = torch.randn(D, INTER, generator=g) / INTER**0.5
    return out


def all_experts(tensors: dict[str, torch.Tensor], layer: int, x, ids, w) -> torch.Tensor:
    """The routed-expert output with every expert in one place."""
    p = expert_prefix(CFG, layer)
    stack = [torch.stack([tensors[f"{p}.ffn.experts.{e}.{n}.weight"] for e in range(E)]) for n in ("w1", "w3", "w2")]
    return ops.moe_experts(x, ids, w, *stack, CFG.swiglu_limit)
