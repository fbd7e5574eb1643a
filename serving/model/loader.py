"""Read official-format DeepSeek-V4 checkpoints (safetensors, sharded with an index file).

A checkpoint directory holds `config.json`, `model.safetensors.index.json` (`weight_map`: tensor
name -> shard file) and the shards; a single `model.safetensors` without an index also works.
`read()` dequantises tensors (see `v4d.serving.model.quant`) into float32 under their official
names, which are the model's state_dict names; `read_into()` copies them into a model's tensors in
the model's precision, as stored when the formats agree (FP8 and packed FP4 stay as they are), one
tensor at a time and read straight onto a CUDA device, so no full copy is ever made on the host.
Reads are lazy and selective: `select()` names only
the tensors one process needs (e.g. an expert shard's experts and no dense weights) and `read()`
opens only the shard files that hold them.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from v4d.kernels.quant import quant_fp4, quant_fp8
from v4d.serving.config import ModelConfig
from v4d.serving.model.build import build_model
from v4d.serving.model.layout import expert_of, inference_name, official_layout, scale_name
from v4d.serving.model.model import Transformer
from v4d.serving.model.moe import LocalExperts
from v4d.serving.model.quant import unpack
from v4d.serving.sizing import Tensor

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# Stored dtypes accepted: quantised or plain float for every weight, whatever the layout says it is
# in the instruct release (Base checkpoints keep routed experts in FP8; converted ones hold BF16),
# and integers for the hash table. The value is decoded by its stored dtype and its shape checked.
_QUANTISED = {torch.float8_e4m3fn, torch.int8, torch.uint8, torch.float4_e2m1fn_x2}
_FLOATS = {torch.bfloat16, torch.float16, torch.float32}
_INTS = {torch.int32, torch.int64}


class CheckpointError(ValueError):
    """A checkpoint that does not match the official layout; the message names file and tensor."""


@dataclass
class ReadStats:
    """What a Checkpoint actually touched: for proving that subset loads skip the rest."""

    shards_opened: set[str] = field(default_factory=set)
    tensors_read: list[str] = field(default_factory=list)  # every get_tensor, scales included


class Checkpoint:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        cfg_path = self.path / CONFIG_FILE
        if not cfg_path.is_file():
            raise CheckpointError(f"{cfg_path}: missing; a checkpoint directory needs config.json")
        self.config = ModelConfig.from_json(cfg_path)
        self.layout: dict[str, Tensor] = official_layout(self.config)
        # inference name -> shard file, and -> the tensor's key in that file
        self.weight_map, self.file_keys = self._index()
        self.stats = ReadStats()
        missing = [n for n in self.layout if n not in self.weight_map]
        if missing:
            raise CheckpointError(
                f"{self.path}: {len(missing)} tensors of the official layout are missing, e.g. {missing[:3]}"
            )

    def _index(self) -> tuple[dict[str, str], dict[str, str]]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                by_key = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
            for shard in set(by_key.values()):
                if Path(shard).is_absolute() or ".." in Path(shard).parts:
                    raise CheckpointError(f"{index}: shard path {shard!r} must stay inside the checkpoint")
                if not (self.path / shard).is_file():
                    raise CheckpointError(f"{index}: names shard {shard!r}, which does not exist")
        elif (self.path / SINGLE_FILE).is_file():
            with safe_open(self.path / SINGLE_FILE, framework="pt") as f:
                by_key = {key: SINGLE_FILE for key in f.keys()}
        else:
            raise CheckpointError(f"{self.path}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
        weight_map: dict[str, str] = {}
        file_keys: dict[str, str] = {}
        for key, shard in by_key.items():
            name = inference_name(key)
            if name is None:
                continue
            if name in file_keys:
                raise CheckpointError(f"{self.path}: {file_keys[name]!r} and {key!r} both map to {name!r}")
            weight_map[name], file_keys[name] = shard, key
        return weight_map, file_keys

    def select(self, experts: Mapping[int, Collection[int]] | None = None, dense: bool = True) -> list[str]:
        """Names to read: dense (non-routed-expert) tensors if `dense`, plus routed experts.

        `experts` maps an MoE layer (main layer i, or num_hidden_layers + k for MTP block k) to the
        expert ids wanted there; layers not in it get none. None means every expert of every layer.
        """
        names = []
        for name in self.layout:
            which = expert_of(name, self.config)
            if which is None:
                if dense:
                    names.append(name)
            elif experts is None or which[1] in experts.get(which[0], ()):
                names.append(name)
        return names

    def read(self, names: Iterable[str], progress: bool = True) -> dict[str, torch.Tensor]:
        """Dequantised float32 tensors (int32 for tid2eid) by official name; opens each shard once."""
        return dict(self.iter_read(names, progress))

    def iter_read(self, names: Iterable[str], progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """As read(), one tensor at a time, so a caller can place each before the next is read."""
        block = tuple(self.config.weight_block_size)
        for name, shard, data, scale in self.iter_raw(names, progress):
            yield name, self.decode(shard, name, data, scale, block)

    def iter_raw(
        self, names: Iterable[str], progress: bool = True, device: str | torch.device = "cpu"
    ) -> Iterator[tuple[str, str, torch.Tensor, torch.Tensor | None]]:
        """(name, shard file, stored tensor, its UE8M0 scales or None) as stored, dtype checked."""
        names = list(names)
        by_shard: dict[str, list[str]] = defaultdict(list)
        for name in names:
            if name not in self.layout:
                raise CheckpointError(f"{name}: not a tensor of the official layout for this config")
            by_shard[self.weight_map[name]].append(name)
        bar = tqdm(total=len(names), unit="tensor", desc=f"Loading {self.path.name}", disable=not progress)
        with bar:
            for shard in sorted(by_shard):
                self.stats.shards_opened.add(shard)
                with safe_open(self.path / shard, framework="pt", device=str(device)) as f:
                    for name in by_shard[shard]:
                        yield name, shard, *self._read_one(f, shard, name, device)
                        bar.update()

    def _read_one(
        self, f, shard: str, name: str, device: str | torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        spec = self.layout[name]
        data = f.get_tensor(self.file_keys[name])
        self.stats.tensors_read.append(name)
        if data.dtype not in (_INTS if spec.storage == "int32" else _QUANTISED | _FLOATS):
            raise CheckpointError(f"{shard}: {name} is stored as {data.dtype}, expected format {spec.storage}")
        scale = None
        if data.dtype in _QUANTISED:
            sname = scale_name(name)
            if sname not in self.weight_map:
                raise CheckpointError(f"{shard}: {name} is quantised but {sname} is not in the checkpoint")
            # Official files keep a scale next to its weight; read it from wherever the index says.
            if self.weight_map[sname] == shard:
                scale = f.get_tensor(self.file_keys[sname])
            else:
                self.stats.shards_opened.add(self.weight_map[sname])
                with safe_open(self.path / self.weight_map[sname], framework="pt", device=str(device)) as g:
                    scale = g.get_tensor(self.file_keys[sname])
            self.stats.tensors_read.append(sname)
        return data, scale

    def decode(
        self, shard: str, name: str, data: torch.Tensor, scale: torch.Tensor | None, block: tuple[int, int]
    ) -> torch.Tensor:
        """A stored tensor's logical values (float32; int32 tables), shape checked."""
        spec = self.layout[name]
        try:
            value = unpack(data, scale, block)
        except ValueError as e:
            raise CheckpointError(f"{shard}: {name}: {e}") from None
        if tuple(value.shape) != spec.shape:
            raise CheckpointError(
                f"{shard}: {name} has shape {tuple(value.shape)} (stored {tuple(data.shape)} {data.dtype}), "
                f"expected {spec.shape} for this config"
            )
        return value


def load_state_dict(
    path: str | Path,
    experts: Mapping[int, Collection[int]] | None = None,
    dense: bool = True,
    progress: bool = True,
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and dequantised tensors of a checkpoint (all of it by default)."""
    ckpt = Checkpoint(path)
    return ckpt.config, ckpt.read(ckpt.select(experts, dense), progress=progress)


def read_into(ckpt: Checkpoint, dest: Mapping[str, torch.Tensor], progress: bool = True) -> None:
    """Copy every checkpoint tensor named in `dest` into it, in `dest`'s format: FP8 weights (with
    `X.scale` in `dest`) and packed FP4 (int8) weights as stored when the checkpoint has that format,
    re-quantised from the decoded values otherwise; plain float/int destinations get decoded values."""
    names = [n for n in dest if n in ckpt.layout]
    extra = [
        n
        for n in dest
        if n not in ckpt.layout and not (n.endswith(".scale") and n.removesuffix(".scale") + ".weight" in dest)
    ]
    if extra:
        raise CheckpointError(f"not tensors of the official layout for this config: {extra[:5]}")
    device = next(iter(dest.values())).device if dest else torch.device("cpu")
    src_device = device if device.type == "cuda" else "cpu"  # safetensors reads straight onto CUDA
    block = tuple(ckpt.config.weight_block_size)
    with torch.no_grad():
        for name, shard, data, scale in ckpt.iter_raw(names, progress, src_device):
            out = dest[name]
            out_scale = dest.get(scale_name(name)) if out.dtype in (torch.float8_e4m3fn, torch.int8) else None
            if out.dtype == torch.int8 and data.dtype in (torch.uint8, torch.float4_e2m1fn_x2):
                data = data.view(torch.int8)  # the same packed bytes
            if (
                out_scale is not None
                and scale is not None
                and (data.dtype, scale.dtype) == (out.dtype, out_scale.dtype)
                and (data.shape, scale.shape) == (out.shape, out_scale.shape)
            ):
                out.copy_(data)
                out_scale.copy_(scale)
                continue
            if scale is None and out_scale is None and tuple(data.shape) == ckpt.layout[name].shape:
                out.copy_(data)  # plain floats / ints: converted in the copy, no fp32 copy of the whole
                continue
            value = ckpt.decode(shard, name, data, scale, block)
            if out_scale is None:
                out.copy_(value)
                continue
            q, s = quant_fp8(value) if out.dtype == torch.float8_e4m3fn else quant_fp4(value)
            out.copy_(q)
            out_scale.copy_(s)


def load_model(
    path: str | Path,
    with_experts: bool = True,
    precision: str = "auto",
    device: str | torch.device = "cpu",
    progress: bool = True,
    mtp: bool = True,
) -> Transformer:
    """The model of a checkpoint with its weights, built on `device` in `precision` (see
    `v4d.serving.precision`; `auto`: deployed on an accelerator, fp32 on the CPU). Below fp32, every
    tensor takes its checkpoint's storage (FP8 / packed FP4 kept when deployed, else BF16; FP32
    stays FP32), so resident bytes are what `v4d plan` budgets. `with_experts=False` skips routed
    experts (an attention engine whose experts live on shards reads none of them); `mtp=False` drops
    the MTP blocks (a serving replica that does not speculate holds, as planned, the main model only)."""
    ckpt = Checkpoint(path)
    model = build_model(ckpt.config, precision, device, with_experts)
    if not mtp:
        model.mtp = torch.nn.ModuleList()
        model.experts = LocalExperts({b.layer: b.ffn for b in model.layers})
    params = model.state_dict()  # views of the parameters: each tensor is copied in as it is read
    names = [n for n in ckpt.select(None if with_experts else {}) if mtp or not n.startswith("mtp.")]
    weights = {n for n in params if not (n.endswith(".scale") and n.removesuffix(".scale") + ".weight" in params)}
    if set(names) != weights:
        raise CheckpointError(f"model and checkpoint layout disagree: {sorted(set(names) ^ weights)[:5]}")
    read_into(ckpt, params, progress)
    if with_experts and isinstance(model.experts, LocalExperts):
        for layer in model.experts.moes:  # stack now, so the loaded model holds its final memory
            model.experts.stacked(layer)
    return model
