"""`v4d generate CHECKPOINT_DIR`: run a checkpoint in-process (no Ray) and print what it generates."""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from v4d.serving.chat import ASSISTANT, BOS, END_THINK, THINK, USER, encode_messages
from v4d.serving.config import ModelConfig
from v4d.serving.generate import generate
from v4d.serving.model.loader import CONFIG_FILE, CheckpointError, load_model
from v4d.serving.precision import PRECISIONS
from v4d.serving.runtime.device import torch_device
from v4d.serving.tokenizer import Tokenizer

CHAT_TOKENS = (BOS, USER, ASSISTANT, THINK, END_THINK)  # what encode_messages writes for one user turn


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated integers like 1,2,3, got {text!r}", param_hint="--token-ids"
        ) from None
    if not ids:
        raise click.BadParameter("at least one token id is required", param_hint="--token-ids")
    return ids


@click.command("generate")
@click.argument("checkpoint_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", help="Prompt text (tokenized after a BOS token).")
@click.option("--token-ids", help="Prompt as comma-separated token ids, e.g. 1,2,3.")
@click.option("--chat", is_flag=True, help="Wrap --prompt as one user turn of the V4 chat format.")
@click.option("--thinking", is_flag=True, help="With --chat: thinking mode (pre-fills <think>).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating after the end-of-sentence token.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Print {"token_ids": [...], "logits": [[...], ...]}: the fp32 logits of the prompt\'s '
    "last position and of each generated step.",
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="auto",
    show_default=True,
    help="deployed keeps the checkpoint's FP8/MXFP4 weights, bf16 or fp32 decode them; auto = "
    "deployed on a GPU, fp32 on the CPU.",
)
@click.option(
    "--skip-special-tokens/--keep-special-tokens",
    default=True,
    show_default=True,
    help="Print the text without special tokens (EOS, </think>, DSML markers), as the APIs' skip_special_tokens does.",
)
@click.option("--device", default="auto", show_default=True, help="torch device; auto = cuda if available, else cpu.")
def command(
    checkpoint_dir: str,
    prompt: str | None,
    token_ids: str | None,
    chat: bool,
    thinking: bool,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    ignore_eos: bool,
    as_json: bool,
    precision: str,
    skip_special_tokens: bool,
    device: str,
) -> None:
    """Load CHECKPOINT_DIR, generate from a prompt (greedy by default), print text and token ids."""
    if (prompt is None) == (token_ids is None):
        raise click.UsageError("give exactly one of --prompt TEXT or --token-ids 1,2,3")
    if (chat or thinking) and prompt is None:
        raise click.UsageError("--chat and --thinking need --prompt")
    try:
        cfg = ModelConfig.from_json(Path(checkpoint_dir) / CONFIG_FILE)
    except (OSError, ValueError) as e:
        raise click.ClickException(f"{checkpoint_dir}: cannot read config.json ({e})") from None
    # Token ids need no tokenizer; one that does not name DeepSeek's BOS/EOS takes config.json's ids.
    try:
        tok = Tokenizer.from_file(checkpoint_dir, bos_id=cfg.bos_token_id, eos_id=cfg.eos_token_id)
    except (FileNotFoundError, ValueError) as e:
        if prompt is not None:
            raise click.UsageError(f"--prompt needs the checkpoint's tokenizer: {e}; use --token-ids") from None
        tok = None
    if tok is not None and prompt is not None:
        missing = [t for t in CHAT_TOKENS if tok.raw.token_to_id(t) is None]
        if chat and missing:
            raise click.UsageError(
                f"--chat: the tokenizer of {checkpoint_dir} has no {missing[0]!r} token "
                "(not a V4 chat tokenizer); use --prompt without --chat, or --token-ids"
            )
        if chat:
            ids = tok.encode_prompt(encode_messages([{"role": "user", "content": prompt}], thinking=thinking))
        else:
            ids = [tok.bos_id, *tok.encode(prompt, special_tokens=True)]
    else:
        ids = _ids(token_ids)
    if not all(0 <= i < cfg.vocab_size for i in ids):
        raise click.BadParameter(f"token ids must be in 0..{cfg.vocab_size - 1}", param_hint="--token-ids")
    try:
        dev = torch_device("nvidia") if device == "auto" else torch.device(device)
        model = load_model(checkpoint_dir, precision=precision, device=dev, progress=not as_json)
    except CheckpointError as e:
        raise click.ClickException(str(e)) from None
    try:
        out = generate(
            model,
            ids,
            max_new_tokens,
            eos_id=None if ignore_eos else model.cfg.eos_token_id,
            temperature=temperature,
            seed=seed,
        )
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(
            json.dumps(
                {
                    "prompt_token_ids": ids,
                    "token_ids": out.token_ids,
                    "finish_reason": out.finish_reason,
                    "logits": [v.tolist() for v in out.logits],
                }
            )
        )
        return
    if tok is not None:
        click.echo(tok.decode(out.token_ids, skip_special_tokens=skip_special_tokens))
    click.echo(f"token ids: {out.token_ids} (finish: {out.finish_reason})")
