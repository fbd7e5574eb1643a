"""Tokenizer: a byte-level BPE in `tokenizer.json` (Hugging Face `tokenizers` format).

Real checkpoints ship their own `tokenizer.json`; random-weight checkpoints get one trained here on
the small English corpus in `v4d/serving/data/corpus.txt`, with the V4 chat special tokens
(`<｜begin▁of▁sentence｜>` = bos id 0, `<｜end▁of▁sentence｜>` = eos id 1, `<｜User｜>`, `<｜Assistant｜>`,
`<think>`, `</think>`, `｜DSML｜`, ...) as whole tokens. Training is deterministic.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from tokenizers.decoders import DecodeStream

from v4d.serving.chat import BOS, EOS, SPECIAL_TOKENS

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    def __init__(self, tok: HFTokenizer):
        self._tok = tok
        self.bos_id = self._special_id(BOS)
        self.eos_id = self._special_id(EOS)

    def _special_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise ValueError(f"tokenizer has no {token!r} token")
        return tid

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json`, or the one inside a checkpoint directory."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        return cls(HFTokenizer.from_file(str(path)))

    @classmethod
    def train(cls, vocab_size: int, corpus: str | Path = CORPUS) -> Tokenizer:
        """Train a byte-level BPE of at most `vocab_size` tokens (fewer if the corpus runs out of merges)."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size: need at least {256 + len(SPECIAL_TOKENS)} (bytes + specials), got {vocab_size}")
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

    def encode(self, text: str) -> list[int]:
        """Token ids of text; special-token strings in it (e.g. from a chat prompt) become their ids.
        (`encode_batch` releases the GIL while it works, `encode` does not: the ingress tokenizes in
        worker threads, and its event loop must keep running meanwhile.)"""
        return self._tok.encode_batch([text], add_special_tokens=False)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def stream(self) -> DecodeStream:
        """An incremental detokenizer: `.step(tok, id)` returns new text, or None while a UTF-8
        character is still incomplete (use `tokenizer.raw` as `tok`)."""
        return DecodeStream(skip_special_tokens=False)

    @property
    def raw(self) -> HFTokenizer:
        return self._tok
