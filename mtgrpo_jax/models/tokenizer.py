"""Tokenizers: transformers' `AutoTokenizer` from a local directory (default: the bundled tiny
byte-level BPE in `mtgrpo_jax/assets/tiny_tokenizer`, built by `mtgrpo_jax.models.build_tokenizer`),
and the one prompt encoder every caller uses (`prompt_text` / `encode_prompt`)."""

from __future__ import annotations

import os
from pathlib import Path

TINY_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_tokenizer"
# Any of these makes a directory a tokenizer directory (tokenizer.json alone is a complete fast tokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
TEMPLATES = ("chat", "raw")


def has_tokenizer(path: str | os.PathLike | None) -> bool:
    """Whether `path` is a local directory holding tokenizer files."""
    if path is None:
        return False
    p = Path(path).expanduser()
    return p.is_dir() and any((p / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: str | os.PathLike | None = None):
    """`AutoTokenizer.from_pretrained(path)` for a local directory (or a Hub id when online).

    Left padding is set because every consumer here (rollout, scoring) pads prompts on the left, and a
    missing pad token falls back to eos so batches can always be padded."""
    from transformers import AutoTokenizer

    path = TINY_TOKENIZER_DIR if path is None else path
    local = Path(path).expanduser()
    if local.exists() and not has_tokenizer(local):
        raise FileNotFoundError(f"no tokenizer files ({' / '.join(TOKENIZER_FILES)}) in {path}")
    tok = AutoTokenizer.from_pretrained(str(local) if local.exists() else str(path))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def check_tokenizer_fits(tokenizer, vocab_size: int, where: str = "tokenizer") -> None:
    """A tokenizer whose ids reach past the model's embedding table would index garbage: refuse it."""
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"{where}: {len(tokenizer)} tokens do not fit the model's vocab_size {vocab_size} "
            "(a tokenizer from another model?)"
        )


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_text(
    tokenizer, messages: list[dict[str, str]], *, template: str = "chat", add_generation_prompt: bool = True
) -> str:
    """Prompt text for `messages` ([{"role": ..., "content": ...}, ...]).

    template "raw": the messages' contents joined by newlines, as is (a base model's transcript).
    template "chat": the tokenizer's chat template; a tokenizer without one gets a plain "Role: content"
    transcript ending with "Assistant:", so base models still get a usable prompt."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"chat message {m!r} needs 'role' and 'content'")
    if template == "raw":
        return "\n".join(m["content"] for m in messages)
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
    return text + ("\nAssistant:" if add_generation_prompt else "")


def encode_prompt(tokenizer, messages: list[dict[str, str]], template: str = "chat") -> list[int]:
    """Token ids of `prompt_text` (no special tokens added: a chat template writes its own)."""
    return list(tokenizer(prompt_text(tokenizer, messages, template=template), add_special_tokens=False)["input_ids"])
