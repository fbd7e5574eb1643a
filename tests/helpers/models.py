"""Random-weight V4 models for the model tests (fp32, eval mode), by preset name."""

from __future__ import annotations

from dataclasses import replace

from v4d.serving.config import get_preset
from v4d.serving.model.model import Transformer, init_weights


def build(name: str, seed: int = 0, **overrides) -> Transformer:
    """Preset `name` with config fields `overrides`, weights drawn from `seed`."""
    cfg = replace(get_preset(name), **overrides) if overrides else get_preset(name)
    return init_weights(Transformer(cfg), seed).eval()
