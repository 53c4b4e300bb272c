"""Tokenizers: transformers' `AutoTokenizer` from a local directory (default: the bundled tiny
byte-level BPE in `mtgrpo_jax/assets/tiny_tokenizer`, built by `mtgrpo_jax.models.build_tokenizer`),
and chat formatting that uses the tokenizer's own chat template when it has one."""

from __future__ import annotations

import os
from pathlib import Path

TINY_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_tokenizer"


def load_tokenizer(path: str | os.PathLike | None = None):
    """`AutoTokenizer.from_pretrained(path)` for a local directory (or a Hub id when online).

    Left padding is set because every consumer here (rollout, scoring) pads prompts on the left, and a
    missing pad token falls back to eos so batches can always be padded."""
    from transformers import AutoTokenizer

    path = TINY_TOKENIZER_DIR if path is None else path
    if Path(path).expanduser().exists() and not Path(path, "tokenizer_config.json").expanduser().is_file() \
            and not Path(path, "tokenizer.json").expanduser().is_file():
        raise FileNotFoundError(f"no tokenizer files (tokenizer.json / tokenizer_config.json) in {path}")
    tok = AutoTokenizer.from_pretrained(str(Path(path).expanduser()) if Path(path).expanduser().exists() else str(path))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def apply_chat_template(tokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
    """Prompt text for `messages` ([{"role": ..., "content": ...}, ...]).

    Uses the tokenizer's chat template when it has one; otherwise a plain "Role: content" transcript
    ending with "Assistant:" so base models without a template still get a usable prompt."""
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"chat message {m!r} needs 'role' and 'content'")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
    return text + ("\nAssistant:" if add_generation_prompt else "")
