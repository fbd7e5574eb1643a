import pytest
import torch

from v4d.serving.config import TINY
from v4d.serving.model.layout import official_layout
from v4d.serving.tokenizer import Tokenizer


def random_tensors(cfg, seed=0):
    """Logical tensors for every name of the official layout (no model needed)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in official_layout(cfg).items():
        if t.storage == "int32":
            out[name] = torch.randint(0, cfg.n_routed_experts, t.shape, generator=g, dtype=torch.int32)
        else:
            out[name] = torch.randn(t.shape, generator=g) * 0.1
    return out


@pytest.fixture(scope="session")
def tiny_tensors():
    return random_tensors(TINY)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return Tokenizer.train(TINY.vocab_size)
