"""An empty model in a precision on a device, every tensor in its final dtype (weights to be filled).

Built under `torch.device(device)` with BF16 as the default dtype below fp32, so nothing is first
allocated in FP32 and then cast; quantised layers come from `weights_in(precision)`. Below fp32,
each remaining float parameter takes its checkpoint storage: FP32 where the official files have
FP32, BF16 otherwise, so the bytes held are what the size math (`v4d.serving.sizing`) counts.
"""

from __future__ import annotations

import torch

from v4d.serving.config import ModelConfig
from v4d.serving.model.layout import official_layout
from v4d.serving.model.linear import weights_in
from v4d.serving.model.model import Transformer
from v4d.serving.precision import resolve_precision

_QUANTISED = (torch.float8_e4m3fn, torch.float8_e8m0fnu)


def build_model(
    cfg: ModelConfig, precision: str = "auto", device: str | torch.device = "cpu", with_experts: bool = True
) -> Transformer:
    device = torch.device(device)
    precision = resolve_precision(precision, device.type)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32 if precision == "fp32" else torch.bfloat16)
    try:
        with weights_in(precision), device:
            model = Transformer(cfg, with_experts=with_experts).eval()
    finally:
        torch.set_default_dtype(default)
    if precision != "fp32":
        layout = official_layout(cfg)
        for name, p in model.named_parameters():
            if p.is_floating_point() and p.dtype not in _QUANTISED:
                spec = layout.get(name)
                p.data = p.data.to(torch.float32 if spec is not None and spec.storage == "fp32" else torch.bfloat16)
    return model
