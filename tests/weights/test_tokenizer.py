"""The shipped byte-level BPE: deterministic training, chat special tokens, lossless round trips."""

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer

from v4d.serving.chat import ASSISTANT, BOS, END_THINK, EOS, SPECIAL_TOKENS, THINK, USER, encode_messages
from v4d.serving.tokenizer import Tokenizer


@pytest.fixture
def tok(tiny_tokenizer):
    return tiny_tokenizer


def test_vocab_size_and_config_ids(tok):
    assert tok.vocab_size == 1024
    assert (tok.bos_id, tok.eos_id) == (0, 1)  # ModelConfig bos_token_id / eos_token_id


def test_training_is_deterministic(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.train(1024)
    assert again.raw.to_str() == tok.raw.to_str()
    assert Tokenizer.from_file(tmp_path).raw.to_str() == tok.raw.to_str()


def test_special_tokens_are_single_ids_in_a_chat_prompt(tok):
    prompt = encode_messages([{"role": "user", "content": "What is 17 + 25?"}], thinking=True)
    ids = tok.encode_prompt(prompt)
    specials = {tok.raw.token_to_id(s): s for s in SPECIAL_TOKENS}
    assert len(specials) == len(SPECIAL_TOKENS) and max(specials) < len(SPECIAL_TOKENS)
    assert [specials[i] for i in ids if i in specials] == [BOS, USER, ASSISTANT, THINK]
    assert tok.decode(ids) == prompt.text
    assert ids == tok.encode(prompt.text, special_tokens=True)  # what the whole string gives, specials parsed
    assert tok.encode(END_THINK + EOS, special_tokens=True) == [tok.raw.token_to_id(END_THINK), 1]


@pytest.mark.parametrize("special", SPECIAL_TOKENS)
def test_special_token_strings_in_plain_text_are_ordinary_tokens(tok, special):
    text = f"hi {special} there"
    ids = tok.encode(text)
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))
    assert tok.decode(ids) == text
    assert tok.strip_special(text) == "hi  there"


def test_chat_markers_count_as_special_even_when_the_file_says_otherwise(tok):
    data = json.loads(tok.raw.to_str())
    for added in data["added_tokens"]:
        added["special"] = added["content"] not in (THINK, END_THINK)  # as some DeepSeek tokenizers ship them
    plain_think = Tokenizer(HFTokenizer.from_str(json.dumps(data)))
    ids = plain_think.encode(f"a {THINK}b{END_THINK}")
    assert not {tok.raw.token_to_id(THINK), tok.raw.token_to_id(END_THINK)} & set(ids)
    assert plain_think.strip_special(f"a {THINK}b{END_THINK}") == "a b"


@pytest.mark.parametrize(
    "text",
    ["The lighthouse keeper lit the lamp.", "naïve café 日本語 🙂 \t\n  spaces", '{"city": "Tokyo", "days": 3}', ""],
)
def test_any_text_round_trips(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_corpus_words_compress(tok):
    text = "The lighthouse keeper climbed the stair every evening."
    assert len(tok.encode(text)) < len(text.encode()) / 2.5


def test_incremental_decoding_waits_for_whole_characters(tok):
    stream, out = tok.stream(), []
    for i in tok.encode("日本 ok"):
        piece = stream.step(tok.raw, i)
        if piece is not None:
            out.append(piece)
    assert "".join(out) == "日本 ok"
    assert all("\ufffd" not in p for p in out)


def test_too_small_vocab_is_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(100)
