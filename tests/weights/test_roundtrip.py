"""Model -> checkpoint -> model: same outputs as the model that wrote it (up to quantisation),
expert shards reading only their experts, and `v4d checkpoint make` / `v4d generate` end to end."""

import json

import pytest
import torch
from click.testing import CliRunner
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from v4d.operator.cli import main
from v4d.serving.checkpoint import fake_quant, make_checkpoint
from v4d.serving.config import TINY_FAST
from v4d.serving.experts import ShardExperts
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


def test_attention_model_and_expert_shards_read_only_their_tensors(ckpt):
    """The serving split as it loads: the attention-only model holds no routed experts, and a shard
    reads exactly its experts (weights and scales). That attention + shards compute the full model's
    MoE is checked once on the transport contract (tests/engine/test_transport.py) and once over Serve
    (tests/engine/test_serve.py)."""
    cfg = TINY_FAST
    attention = load_model(ckpt, with_experts=False, progress=False)
    assert not any(".ffn.experts." in k for k in attention.state_dict())
    n_moe = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    for part in (0, 1):  # two shards: even and odd experts of every MoE layer
        slots = [list(range(part, cfg.n_routed_experts, 2)) for _ in range(n_moe)]
        reader = Checkpoint(ckpt)
        names = reader.select(dict(enumerate(slots)), dense=False)
        shard = ShardExperts(cfg, slots, reader.read(names, progress=False))
        assert sorted(reader.stats.tensors_read) == sorted(names + [scale_name(n) for n in names])
        assert len(names) == 3 * n_moe * cfg.n_routed_experts // 2
        assert shard.nbytes() == 3 * n_moe * len(slots[0]) * cfg.hidden_size * cfg.moe_intermediate_size * 4


def test_generate_json_gives_the_logits_of_every_step(ckpt, loaded):
    prompt = PROMPT[:12]
    res = CliRunner().invoke(
        main,
        [
            "generate",
            str(ckpt),
            "--token-ids",
            ",".join(map(str, prompt)),
            "--max-new-tokens",
            "3",
            "--ignore-eos",
            "--json",
        ],
    )
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
    res = CliRunner().invoke(
        main, ["generate", str(ckpt), "--prompt", "The lighthouse keeper", "--max-new-tokens", "2"]
    )
    assert res.exit_code == 0, res.output
    assert "token ids: [" in res.stdout
    chat = CliRunner().invoke(
        main, ["generate", str(ckpt), "--prompt", "Hi", "--chat", "--thinking", "--json", "--max-new-tokens", "1"]
    )
    assert json.loads(chat.stdout)["prompt_token_ids"][-2:] == [3, 4]  # <｜Assistant｜><think>


def test_generate_prints_text_without_special_tokens_unless_kept(ckpt, monkeypatch):
    from v4d.operator.commands import generate as command
    from v4d.serving.chat import END_THINK, EOS
    from v4d.serving.generate import Generation
    from v4d.serving.tokenizer import Tokenizer

    tok = Tokenizer.from_file(str(ckpt))
    answer = tok.encode(f"plan{END_THINK} sea", special_tokens=True) + [tok.eos_id]
    monkeypatch.setattr(command, "generate", lambda *a, **k: Generation(answer, [], "stop"))
    args = ["generate", str(ckpt), "--prompt", "Hi", "--max-new-tokens", "4"]
    skipped = CliRunner().invoke(main, args).stdout.splitlines()[-2]
    kept = CliRunner().invoke(main, [*args, "--keep-special-tokens"]).stdout.splitlines()[-2]
    assert END_THINK in kept and kept.endswith(EOS)
    assert END_THINK not in skipped and EOS not in skipped and "sea" in skipped


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "{ckpt}"], "exactly one of --prompt"),
        (["generate", "{ckpt}", "--token-ids", "1,x"], "comma-separated integers"),
        (["generate", "{ckpt}", "--token-ids", "1,99999"], "token ids must be in 0..1023"),
        (["checkpoint", "make", "deepseek-v4-flash", "{tmp}"], "random checkpoints are limited"),
        (["checkpoint", "make", "no-such-model", "{tmp}"], "not a preset"),
        (["checkpoint", "make", "v4-tiny", "{tmp}", "--shard-size", "big"], "shard size"),
    ],
)
def test_cli_errors_are_specific(ckpt, tmp_path, args, message):
    res = CliRunner().invoke(main, [a.format(ckpt=ckpt, tmp=tmp_path / "out") for a in args])
    assert res.exit_code != 0
    assert message in res.output


def test_checkpoint_make_command(tmp_path):
    res = CliRunner().invoke(
        main, ["checkpoint", "make", "v4-tiny-fast", str(tmp_path), "--seed", str(SEED), "--shard-size", "1MB"]
    )
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


def test_generate_token_ids_without_a_chat_tokenizer(ckpt, loaded, tmp_path):
    # A checkpoint as another tool writes it: config.json without MTP but with the official
    # compress_ratios length, its own BOS/EOS ids, and a tokenizer that names none of DeepSeek's tokens.
    for f in ckpt.iterdir():
        if f.name not in ("config.json", "tokenizer.json"):
            (tmp_path / f.name).symlink_to(f)
    config = {**TINY_FAST.to_dict(), "num_nextn_predict_layers": 0, "bos_token_id": 7, "eos_token_id": 9}
    assert len(config["compress_ratios"]) == TINY_FAST.num_hidden_layers + 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    plain = HFTokenizer(models.BPE())
    plain.pre_tokenizer, plain.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    plain.train_from_iterator(
        ["the lighthouse keeper", "hello world"],
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    plain.save(str(tmp_path / "tokenizer.json"))

    run = CliRunner().invoke(
        main,
        [
            "generate",
            str(tmp_path),
            "--token-ids",
            ",".join(map(str, PROMPT[:12])),
            "--max-new-tokens",
            "2",
            "--ignore-eos",
            "--json",
        ],
    )
    assert run.exit_code == 0, run.output
    out = json.loads(run.stdout)
    assert torch.allclose(torch.tensor(out["logits"][0]), loaded.prefill_logits(PROMPT[:12])[-1], atol=1e-4)
    text = CliRunner().invoke(main, ["generate", str(tmp_path), "--prompt", "hello", "--max-new-tokens", "1", "--json"])
    assert text.exit_code == 0, text.output
    assert json.loads(text.stdout)["prompt_token_ids"] == [7, *plain.encode("hello").ids]  # config.json's BOS
    chat = CliRunner().invoke(main, ["generate", str(tmp_path), "--prompt", "hello", "--chat"])
    assert chat.exit_code != 0 and "not a V4 chat tokenizer" in chat.output
    (tmp_path / "tokenizer.json").unlink()
    bare = CliRunner().invoke(main, ["generate", str(tmp_path), "--prompt", "hello"])
    assert bare.exit_code != 0 and "--prompt needs the checkpoint's tokenizer" in bare.output
