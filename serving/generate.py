"""In-process generation (no Ray): prefill the prompt, then decode token by token.

The quickest way to check that a checkpoint loads and answers, and a hook for comparing
implementations: every step's full fp32 logit vector is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from v4d.serving.model.model import Transformer


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)  # generated tokens only
    # logits[i]: the fp32 vector token_ids[i] was chosen from (logits[0]: the prompt's last position)
    logits: list[torch.Tensor] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" when EOS was generated


def generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int = 32,
    eos_id: int | None = None,
    temperature: float = 0.0,
    seed: int = 0,
) -> Generation:
    """Greedy when temperature == 0, otherwise sampled (seeded, so reproducible)."""
    if not prompt_ids:
        raise ValueError("prompt: at least one token id is required")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be at least 1, got {max_new_tokens}")
    gen = torch.Generator().manual_seed(seed)
    kv, seq = model.scratch_cache(len(prompt_ids) + max_new_tokens)
    out = Generation()
    chunk = list(prompt_ids)
    while True:
        logits = model.forward([(chunk, seq)], kv)[0].float().cpu()
        out.logits.append(logits)
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            tok = int(torch.multinomial(probs, 1, generator=gen))
        else:
            tok = int(logits.argmax())
        out.token_ids.append(tok)
        if tok == eos_id:
            out.finish_reason = "stop"
            return out
        if len(out.token_ids) == max_new_tokens:
            return out
        chunk = [tok]
