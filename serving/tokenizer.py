"""Tokenizer: a byte-level BPE in `tokenizer.json` (Hugging Face `tokenizers` format).

Real checkpoints ship their own `tokenizer.json`; random-weight checkpoints get one trained here on
the small English corpus in `v4d/serving/data/corpus.txt`, with the V4 chat special tokens
(`<｜begin▁of▁sentence｜>` = bos id 0, `<｜end▁of▁sentence｜>` = eos id 1, `<｜User｜>`, `<｜Assistant｜>`,
`<think>`, `</think>`, `｜DSML｜`, ...) as whole tokens. Training is deterministic.

Client text is encoded as plain text: a special-token string in it becomes ordinary tokens, so only
the chat template (`encode_prompt`) or a raw prompt the client writes whole (`encode(text,
special_tokens=True)`) can put special tokens in front of the model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from tokenizers.decoders import DecodeStream

from v4d.serving.chat import BOS, EOS, SPECIAL_TOKENS, Prompt, Special

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    def __init__(self, tok: HFTokenizer, bos_id: int | None = None, eos_id: int | None = None):
        """`bos_id` / `eos_id` (config.json's `bos_token_id` / `eos_token_id`) stand in when the
        tokenizer does not name DeepSeek's BOS / EOS tokens; without them that is an error."""
        self._tok = tok
        self.bos_id = self._special_id(BOS, bos_id)
        self.eos_id = self._special_id(EOS, eos_id)
        # The chat markers count as special even where tokenizer.json marks them otherwise (some
        # DeepSeek tokenizers ship `<think>` as a plain added token).
        data = json.loads(tok.to_str())
        for added in data["added_tokens"]:
            added["special"] = added["special"] or added["content"] in SPECIAL_TOKENS
        self._plain = HFTokenizer.from_str(json.dumps(data))  # the same tokenizer, blind to special tokens
        self._plain.encode_special_tokens = True
        specials = sorted((a["content"] for a in data["added_tokens"] if a["special"]), key=len, reverse=True)
        self._specials = re.compile("|".join(map(re.escape, specials)))

    def _special_id(self, token: str, fallback: int | None = None) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            tid = fallback
        if tid is None:
            raise ValueError(f"tokenizer has no {token!r} token")
        return tid

    @classmethod
    def from_file(cls, path: str | Path, bos_id: int | None = None, eos_id: int | None = None) -> Tokenizer:
        """Load `tokenizer.json`, or the one inside a checkpoint directory."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        return cls(HFTokenizer.from_file(str(path)), bos_id, eos_id)

    @classmethod
    def train(cls, vocab_size: int, corpus: str | Path = CORPUS) -> Tokenizer:
        """Train a byte-level BPE of at most `vocab_size` tokens (fewer if the corpus runs out of merges)."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(
                f"vocab_size: need at least {256 + len(SPECIAL_TOKENS)} (bytes + specials), got {vocab_size}"
            )
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,  # first, in order: BOS -> 0, EOS -> 1
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train([str(corpus)], trainer)
        return cls(tok)

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, special_tokens: bool = False) -> list[int]:
        """Token ids of text. Special-token strings in it stay text (ordinary tokens) unless
        `special_tokens`, for a raw prompt that its author writes whole (/v1/completions).
        (`encode_batch` releases the GIL while it works, `encode` does not: the ingress tokenizes in
        worker threads, and its event loop must keep running meanwhile.)"""
        tok = self._tok if special_tokens else self._plain
        return tok.encode_batch([text], add_special_tokens=False)[0].ids

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of a chat prompt: its `Special` markers as special tokens, the rest as plain text.

        Consecutive plain pieces are encoded together, so a prompt without special-token strings in
        client text gets exactly the ids of encoding `prompt.text` with special tokens parsed."""
        ids: list[int] = []
        text = ""
        for piece in prompt.pieces:
            if isinstance(piece, Special):
                ids += self.encode(text) + [self._special_id(piece)]
                text = ""
            else:
                text += piece
        return ids + self.encode(text)

    def strip_special(self, text: str) -> str:
        """Text without special-token strings (`skip_special_tokens` on text already parsed)."""
        return self._specials.sub("", text)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def stream(self) -> DecodeStream:
        """An incremental detokenizer: `.step(tok, id)` returns new text, or None while a UTF-8
        character is still incomplete (use `tokenizer.raw` as `tok`)."""
        return DecodeStream(skip_special_tokens=False)

    @property
    def raw(self) -> HFTokenizer:
        return self._tok
