"""Checkpoint writer and loader: official file format, sharding, dequantisation, subset reads."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from v4d.kernels.quant import dequant_fp4, dequant_fp8, quant_fp4, quant_fp8
from v4d.serving.checkpoint import fake_quant, parse_size, write_checkpoint
from v4d.serving.config import TINY
from v4d.serving.model.layout import official_layout, scale_name
from v4d.serving.model.loader import Checkpoint, CheckpointError, load_state_dict
from v4d.serving.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, tiny_tensors, tiny_tokenizer):
    return write_checkpoint(
        tiny_tensors, TINY, tmp_path_factory.mktemp("ckpt"), shard_size=256 << 10, tokenizer=tiny_tokenizer
    )


def test_files_are_in_the_official_format(ckpt_dir, tiny_tokenizer):
    index = json.loads((ckpt_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert json.loads((ckpt_dir / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]
    total, dtypes = 0, {}
    for shard in shards:
        with safe_open(ckpt_dir / shard, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for k in f.keys():
                assert index["weight_map"][k] == shard
                t = f.get_tensor(k)
                dtypes[k] = t.dtype
                total += t.numel() * t.element_size()
    assert index["metadata"]["total_size"] == total
    assert dtypes["layers.2.attn.wq_a.weight"] == torch.float8_e4m3fn
    assert dtypes["layers.2.attn.wq_a.scale"] == torch.float8_e8m0fnu
    assert dtypes["layers.2.ffn.experts.3.w1.weight"] == torch.int8
    assert dtypes["layers.2.ffn.experts.3.w1.scale"] == torch.float8_e8m0fnu
    assert dtypes["layers.2.attn.compressor.wkv.weight"] == torch.bfloat16
    assert dtypes["hc_head_fn"] == torch.float32 and dtypes["layers.0.ffn.gate.tid2eid"] == torch.int32
    assert Tokenizer.from_file(ckpt_dir).raw.to_str() == tiny_tokenizer.raw.to_str()


def test_load_returns_the_quantised_values(ckpt_dir, tiny_tensors):
    cfg, loaded = load_state_dict(ckpt_dir, progress=False)
    assert cfg == TINY
    expect = fake_quant(tiny_tensors, TINY)
    assert loaded.keys() == expect.keys() == official_layout(TINY).keys()
    for name, t in expect.items():
        assert torch.equal(loaded[name], t), name
    # quantisation really happened, and stayed close
    w = "layers.4.ffn.experts.0.w2.weight"
    assert not torch.equal(loaded[w], tiny_tensors[w])
    assert torch.allclose(loaded[w], tiny_tensors[w], atol=0.1)


def test_expert_subset_reads_only_what_it_needs(ckpt_dir):
    ckpt = Checkpoint(ckpt_dir)
    want = {2: [0, 5], 6: [15]}  # layer 6 = the MTP block
    names = ckpt.select(want, dense=False)
    out = ckpt.read(names, progress=False)
    assert sorted(out) == sorted(
        f"{p}.ffn.experts.{e}.w{i}.weight"
        for p, e in (("layers.2", 0), ("layers.2", 5), ("mtp.0", 15))
        for i in (1, 2, 3)
    )
    assert sorted(ckpt.stats.tensors_read) == sorted(names + [n.replace(".weight", ".scale") for n in names])
    index = json.loads((ckpt_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert ckpt.stats.shards_opened == {index[n] for n in names}
    assert len(ckpt.stats.shards_opened) < len(set(index.values()))


def test_dense_only_read_skips_every_routed_expert(ckpt_dir):
    ckpt = Checkpoint(ckpt_dir)
    ckpt.read(ckpt.select({}, dense=True), progress=False)
    assert not [n for n in ckpt.stats.tensors_read if ".ffn.experts." in n]
    assert "layers.2.ffn.shared_experts.w1.scale" in ckpt.stats.tensors_read


def test_single_file_checkpoint_without_index(tmp_path, ckpt_dir):
    save_file(_single_file(ckpt_dir), tmp_path / "model.safetensors")
    TINY.to_json(tmp_path / "config.json")
    _, a = load_state_dict(tmp_path, progress=False)
    _, b = load_state_dict(ckpt_dir, progress=False)
    assert all(torch.equal(a[k], b[k]) for k in b)


HF_NAMES = {  # released name -> a Hugging Face style name the official converter also accepts
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "layers.1.attn_norm.weight": "model.layers.1.input_layernorm.weight",
    "layers.2.attn.wq_a.weight": "model.layers.2.self_attn.q_a_proj.weight",
    "layers.2.attn.wq_a.scale": "model.layers.2.self_attn.q_a_proj.weight_scale_inv",
    "layers.2.ffn.gate.bias": "model.layers.2.mlp.gate.e_score_correction_bias",
    "layers.2.ffn.experts.3.w1.weight": "model.layers.2.mlp.experts.3.gate_proj.weight",
    "layers.2.ffn.experts.3.w1.scale": "model.layers.2.mlp.experts.3.gate_proj.weight_scale_inv",
}


def _single_file(ckpt_dir):
    index = json.loads((ckpt_dir / "model.safetensors.index.json").read_text())["weight_map"]
    merged = {}
    for shard in set(index.values()):
        with safe_open(ckpt_dir / shard, framework="pt") as f:
            merged.update({k: f.get_tensor(k) for k in f.keys()})
    return merged


def test_hugging_face_style_names_map_like_the_official_converter(tmp_path, ckpt_dir):
    merged = _single_file(ckpt_dir)
    renamed = {HF_NAMES.get(k, k): v for k, v in merged.items()}
    renamed["mtp.0.embed.weight"] = merged["embed.weight"].clone()  # MTP copies of the shared tensors: dropped
    renamed["mtp.0.head.weight"] = merged["head.weight"].clone()
    save_file(renamed, tmp_path / "model.safetensors")
    TINY.to_json(tmp_path / "config.json")
    ckpt = Checkpoint(tmp_path)
    assert ckpt.file_keys["layers.2.attn.wq_a.scale"] == "model.layers.2.self_attn.q_a_proj.weight_scale_inv"
    _, a = load_state_dict(tmp_path, progress=False)
    _, b = load_state_dict(ckpt_dir, progress=False)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    renamed["embed.weight"] = merged["embed.weight"].clone()
    save_file(renamed, tmp_path / "model.safetensors")
    with pytest.raises(
        CheckpointError, match="'embed.weight' and 'model.embed_tokens.weight' both map to 'embed.weight'"
    ):
        Checkpoint(tmp_path)


def test_other_storage_formats_load(tmp_path, tiny_tensors):
    """BF16 copies of quantised weights (a dequantised conversion), FP8 routed experts (as in the Base
    release), an FP8 LM head and float4_e2m1fn_x2 experts all decode by their stored dtype."""
    TINY.to_json(tmp_path / "config.json")
    plain = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in tiny_tensors.items()}
    fp8 = ["layers.2.ffn.experts.1.w2.weight", "head.weight"]
    for name in fp8:
        plain[name], plain[scale_name(name)] = quant_fp8(tiny_tensors[name])
    f4 = "layers.3.ffn.experts.2.w1.weight"  # torch's packed FP4 dtype (safetensors F4) instead of int8 bytes
    packed, plain[scale_name(f4)] = quant_fp4(tiny_tensors[f4])
    plain[f4] = packed.view(torch.uint8).view(torch.float4_e2m1fn_x2)
    save_file(plain, tmp_path / "model.safetensors")
    _, loaded = load_state_dict(tmp_path, progress=False)
    assert torch.equal(loaded["layers.2.attn.wq_a.weight"], plain["layers.2.attn.wq_a.weight"].float())
    assert torch.equal(loaded[f4], dequant_fp4(packed, plain[scale_name(f4)]))
    for name in fp8:
        assert torch.equal(loaded[name], dequant_fp8(plain[name], plain[scale_name(name)]))


def _corrupt(ckpt_dir, tmp_path, name, value=None):
    """Copy the checkpoint into tmp_path with `name` replaced (or dropped when value is None)."""
    index = json.loads((ckpt_dir / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        with safe_open(ckpt_dir / shard, framework="pt") as f:
            data = {k: f.get_tensor(k) for k in f.keys()}
        if name in data:
            del data[name]
            if value is not None:
                data[name] = value
        save_file(data, tmp_path / shard)
    if value is None:
        del index["weight_map"][name]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((ckpt_dir / "config.json").read_text())
    return tmp_path


@pytest.mark.parametrize(
    "name,value,match",
    [
        ("layers.3.attn.wkv.weight", None, "tensors of the official layout are missing"),
        ("layers.3.attn.wkv.scale", None, "layers.3.attn.wkv.weight is quantised but layers.3.attn.wkv.scale is not"),
        ("layers.3.attn.wkv.weight", torch.zeros(200, 128, dtype=torch.float8_e4m3fn), "scale shape"),
        (
            "layers.3.attn_norm.weight",
            torch.zeros(64),
            r"layers.3.attn_norm.weight has shape \(64,\).*expected \(128,\)",
        ),
        ("layers.0.ffn.gate.tid2eid", torch.zeros(1024, 2), "stored as torch.float32, expected format int32"),
    ],
)
def test_bad_checkpoints_name_file_and_tensor(ckpt_dir, tmp_path, name, value, match):
    bad = _corrupt(ckpt_dir, tmp_path, name, value)
    with pytest.raises(CheckpointError, match=match):
        load_state_dict(bad, progress=False)


def test_missing_files_are_reported(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        Checkpoint(tmp_path)
    TINY.to_json(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="neither model.safetensors.index.json nor model.safetensors"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"embed.weight": "x.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="names shard 'x.safetensors', which does not exist"):
        Checkpoint(tmp_path)


def test_progress_bar_counts_tensors(ckpt_dir, capsys):
    ckpt = Checkpoint(ckpt_dir)
    ckpt.read(ckpt.select({}, dense=False) + ["norm.weight", "head.weight"], progress=True)
    assert "2/2" in capsys.readouterr().err


def test_writer_rejects_mismatches(tmp_path, tiny_tensors, tiny_tokenizer):
    with pytest.raises(ValueError, match="bos_token_id/eos_token_id: the config says 5/1"):
        write_checkpoint(tiny_tensors, replace(TINY, bos_token_id=5), tmp_path, tokenizer=tiny_tokenizer)
    bad = dict(tiny_tensors, **{"norm.weight": torch.ones(7)})
    with pytest.raises(ValueError, match=r"norm.weight: shape \(7,\), expected \(128,\)"):
        write_checkpoint(bad, TINY, tmp_path, tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match=r"missing \['embed.weight'\]"):
        write_checkpoint(
            {k: v for k, v in tiny_tensors.items() if k != "embed.weight"}, TINY, tmp_path, tokenizer=tiny_tokenizer
        )


def test_parse_size():
    assert parse_size("512MB") == 512 << 20 and parse_size("4GiB") == 4 << 30
    assert parse_size("100k") == 100 << 10 and parse_size("12345") == 12345
    with pytest.raises(ValueError, match="shard size"):
        parse_size("lots")
