"""Model -> checkpoint -> model: same outputs as the model that wrote it (up to quantisation),
expert shards loading only their experts, and `v4d checkpoint make` / `v4d generate` end to end."""

import json

import pytest
import torch
from click.testing import CliRunner

from v4d.kernels import ops
from v4d.operator.cli import main
from v4d.serving.checkpoint import fake_quant, make_checkpoint
from v4d.serving.config import TINY_FAST
from v4d.serving.model.layout import scale_name
from v4d.serving.model.loader import Checkpoint, load_model
from v4d.serving.model.model import Transformer, init_weights

SEED = 3
# 33 tokens: with the 8-token window, ratios 4 and 16, several CSA and two HCA blocks close.
PROMPT = torch.randint(2, TINY_FAST.vocab_size, (33,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint("v4-tiny-fast", tmp_path_factory.mktemp("rt"), seed=SEED, shard_size="256KB")


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_model(ckpt, progress=False)


@pytest.fixture(scope="module")
def loaded_logits(loaded):
    return loaded.prefill_logits(PROMPT)


def test_loaded_model_equals_the_writer_with_quantised_weights(loaded_logits):
    writer = init_weights(Transformer(TINY_FAST), SEED)
    orig = writer.prefill_logits(PROMPT)
    writer.load_state_dict(fake_quant(writer.state_dict(), TINY_FAST))
    assert torch.equal(loaded_logits, writer.prefill_logits(PROMPT))
    # quantisation changed the answer, but kept it correlated (wrong decoding would not: rel. error ~1.4)
    assert not torch.equal(orig, loaded_logits)
    assert (orig - loaded_logits).norm() / orig.norm() < 0.6


def test_attention_engine_plus_expert_shards_equals_the_full_model(ckpt, loaded_logits):
    cfg = TINY_FAST
    attention = load_model(ckpt, with_experts=False, progress=False)
    assert not any(".ffn.experts." in k for k in attention.state_dict())
    moe_layers = range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
    shards = []
    for part in (0, 1):  # two shards: even and odd experts of every MoE layer
        want = {layer: list(range(part, cfg.n_routed_experts, 2)) for layer in moe_layers}
        reader = Checkpoint(ckpt)
        names = reader.select(want, dense=False)
        shards.append((want, reader.read(names, progress=False)))
        assert sorted(reader.stats.tensors_read) == sorted(names + [scale_name(n) for n in names])
        assert len(names) == 3 * len(moe_layers) * cfg.n_routed_experts // 2

    def backend_of(want, tensors):
        stacks = {}
        for layer, experts in want.items():
            p = f"layers.{layer}" if layer < cfg.num_hidden_layers else f"mtp.{layer - cfg.num_hidden_layers}"
            w = [torch.stack([tensors[f"{p}.ffn.experts.{e}.{n}.weight"] for e in experts]) for n in ("w1", "w3", "w2")]
            local = torch.full((cfg.n_routed_experts,), -1, dtype=torch.long)
            local[experts] = torch.arange(len(experts))
            stacks[layer] = (local, w)

        def backend(layer, x, ids, weights):
            local, (w1, w3, w2) = stacks[layer]
            lid = torch.where(ids >= 0, local.index_select(0, ids.clamp(min=0).flatten()).view(ids.shape), -1)
            return ops.moe_experts(x, lid, weights, w1, w3, w2, cfg.swiglu_limit)
        return backend

    a, b = (backend_of(*s) for s in shards)
    attention.experts = lambda layer, x, ids, w: a(layer, x, ids, w) + b(layer, x, ids, w)
    assert torch.allclose(attention.prefill_logits(PROMPT), loaded_logits, atol=1e-5, rtol=1e-5)


def test_generate_json_gives_the_logits_of_every_step(ckpt, loaded):
    prompt = PROMPT[:12]
    res = CliRunner().invoke(main, ["generate", str(ckpt), "--token-ids", ",".join(map(str, prompt)),
                                    "--max-new-tokens", "3", "--ignore-eos", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["prompt_token_ids"] == prompt and out["finish_reason"] == "length"
    ids, logits = out["token_ids"], torch.tensor(out["logits"])
    assert len(ids) == 3 and logits.shape == (3, TINY_FAST.vocab_size)
    assert ids == logits.argmax(-1).tolist()  # greedy
    # step i's logits are the full-pass logits of the prompt extended by the first i generated tokens
    full = loaded.prefill_logits(prompt + ids[:2])
    assert torch.allclose(logits[0], full[len(prompt) - 1], atol=1e-4)
    assert torch.allclose(logits[2], full[-1], atol=1e-4)


def test_generate_text_prompt_and_chat(ckpt):
    res = CliRunner().invoke(main, ["generate", str(ckpt), "--prompt", "The lighthouse keeper", "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    assert "token ids: [" in res.stdout
    chat = CliRunner().invoke(main, ["generate", str(ckpt), "--prompt", "Hi", "--chat", "--thinking", "--json",
                                     "--max-new-tokens", "1"])
    assert json.loads(chat.stdout)["prompt_token_ids"][-2:] == [3, 4]  # <｜Assistant｜><think>


@pytest.mark.parametrize("args,message", [
    (["generate", "{ckpt}"], "exactly one of --prompt"),
    (["generate", "{ckpt}", "--token-ids", "1,x"], "comma-separated integers"),
    (["generate", "{ckpt}", "--token-ids", "1,99999"], "token ids must be in 0..1023"),
    (["checkpoint", "make", "deepseek-v4-flash", "{tmp}"], "random checkpoints are limited"),
    (["checkpoint", "make", "no-such-model", "{tmp}"], "not a preset"),
    (["checkpoint", "make", "v4-tiny", "{tmp}", "--shard-size", "big"], "shard size"),
])
def test_cli_errors_are_specific(ckpt, tmp_path, args, message):
    res = CliRunner().invoke(main, [a.format(ckpt=ckpt, tmp=tmp_path / "out") for a in args])
    assert res.exit_code != 0
    assert message in res.output


def test_checkpoint_make_command(tmp_path):
    res = CliRunner().invoke(main, ["checkpoint", "make", "v4-tiny-fast", str(tmp_path), "--seed", str(SEED),
                                    "--shard-size", "1MB"])
    assert res.exit_code == 0, res.output
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "config.json").is_file()


def test_load_in_bf16(ckpt, loaded_logits):
    model = load_model(ckpt, precision="bf16", progress=False)
    assert model.embed.weight.dtype == torch.bfloat16 and model.layers[0].ffn.gate.tid2eid.dtype == torch.int32
    err = (model.prefill_logits(PROMPT).float() - loaded_logits).norm(dim=-1) / loaded_logits.norm(dim=-1)
    # bf16 rounding: most positions stay within a few percent; a few differ more where rounding
    # flips a router's or indexer's top-k choice
    assert err.median() < 0.05 and err.max() < 1.0
