"""Write checkpoints in the official DeepSeek-V4 format (what `v4d checkpoint make` does).

A checkpoint directory gets `config.json`, `model-0000i-of-0000n.safetensors` shards with
`model.safetensors.index.json`, and `tokenizer.json`. Weights are stored as the released files store
them (FP8 block-scaled, MXFP4 routed experts, BF16/FP32 elsewhere; see v4d.serving.model.layout),
so random-weight demos load through exactly the path real weights take.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from v4d.serving.config import ModelConfig, get_preset
from v4d.serving.model.layout import official_layout, scale_name
from v4d.serving.model.loader import CONFIG_FILE, INDEX_FILE
from v4d.serving.model.model import Transformer, init_weights
from v4d.serving.model.quant import pack, unpack
from v4d.serving.sizing import params_total
from v4d.serving.tokenizer import TOKENIZER_FILE, Tokenizer

DEFAULT_SHARD_SIZE = 4 << 30  # bytes; the released checkpoints use shards of a few GB
MAX_RANDOM_PARAMS = 2_000_000_000  # random checkpoints are for demos and tests, not full-size presets


def fake_quant(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The values a checkpoint written from `tensors` loads back as (quantised, then dequantised)."""
    layout, block = official_layout(cfg), tuple(cfg.weight_block_size)
    return {name: unpack(*pack(t, layout[name].storage, block), block) for name, t in tensors.items()}


def parse_size(text: str | int) -> int:
    """'512MB', '4GiB', '100k' or a plain byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise ValueError(f"shard size: expected bytes like '512MB' or '4GiB', got {text!r}")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def write_checkpoint(
    tensors: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: str | Path,
    shard_size: int = DEFAULT_SHARD_SIZE,
    tokenizer: Tokenizer | None = None,
) -> Path:
    """Quantise `tensors` (official names, logical values) per the layout and write a checkpoint."""
    layout, block = official_layout(cfg), tuple(cfg.weight_block_size)
    tok = tokenizer or Tokenizer.train(cfg.vocab_size)
    if (tok.bos_id, tok.eos_id) != (cfg.bos_token_id, cfg.eos_token_id):
        raise ValueError(
            f"bos_token_id/eos_token_id: the config says {cfg.bos_token_id}/{cfg.eos_token_id}, "
            f"the tokenizer has {tok.bos_id}/{tok.eos_id}"
        )
    missing = [n for n in layout if n not in tensors]
    extra = [n for n in tensors if n not in layout]
    if missing or extra:
        raise ValueError(f"tensors do not match the official layout: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, spec in layout.items():
        if tuple(tensors[name].shape) != spec.shape:
            raise ValueError(f"{name}: shape {tuple(tensors[name].shape)}, expected {spec.shape}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Assign tensors to shards in layout order (a layer's tensors stay together) before writing any.
    shards: list[list[str]] = [[]]
    size = 0
    for name, spec in layout.items():
        nbytes = spec.nbytes()  # on disk, scales included
        if shards[-1] and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        data: dict[str, torch.Tensor] = {}
        for name in names:
            stored, scale = pack(tensors[name].detach().cpu(), layout[name].storage, block)
            data[name] = stored
            if scale is not None:
                data[scale_name(name)] = scale
        for key, t in data.items():
            weight_map[key] = file
            total += t.numel() * t.element_size()
        save_file(data, out / file, metadata={"format": "pt"})
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg.to_json(out / CONFIG_FILE)
    tok.save(out / TOKENIZER_FILE)
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": tok.raw.id_to_token(tok.bos_id),
                "eos_token": tok.raw.id_to_token(tok.eos_id),
                "model_max_length": cfg.max_position_embeddings,
            },
            indent=2,
            ensure_ascii=False,
        )
    )
    return out


def make_checkpoint(
    model: str | ModelConfig,
    out_dir: str | Path,
    seed: int = 0,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
) -> Path:
    """A random-weight checkpoint of a preset (by name) or config, with the model's own
    initialisation (`init_weights`), in the official format, plus a trained tokenizer."""
    cfg = get_preset(model) if isinstance(model, str) else model
    n = params_total(cfg, mtp=True)
    if n > MAX_RANDOM_PARAMS:
        raise ValueError(
            f"model: {n / 1e9:.1f}B parameters; random checkpoints are limited to "
            f"{MAX_RANDOM_PARAMS / 1e9:.0f}B (use a small preset such as v4-tiny, or a custom config.json)"
        )
    net = init_weights(Transformer(cfg), seed)
    return write_checkpoint(net.state_dict(), cfg, out_dir, parse_size(shard_size))
