"""The prompts that suit the checkpoint: base models get the released R1-style transcript as raw text,
instruct models the task's question as the user turn of their own chat template; the config can say which
kind the checkpoint is, `rollout.prompt_style` / `rollout.template` override, and one encoder builds them."""

from __future__ import annotations

import shutil

import pytest

from mtgrpo_jax.config import from_dict
from mtgrpo_jax.models import load_tokenizer
from mtgrpo_jax.models.tokenizer import TINY_TOKENIZER_DIR, encode_prompt, prompt_text
from mtgrpo_jax.tasks import get_task
from mtgrpo_jax.tasks.base import PROMPT_PREFIX, PROMPT_SUFFIX
from mtgrpo_jax.train.policy import resolve_prompts

EXAMPLE = {"question": "q", "answer": {"numbers": [3, 5, 7], "target": 22}}


@pytest.fixture(scope="module")
def chat_tok():
    return load_tokenizer()  # the bundled tiny tokenizer ships a chat template


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("plain")
    shutil.copytree(TINY_TOKENIZER_DIR, d, dirs_exist_ok=True)
    (d / "chat_template.jinja").unlink()
    tok = load_tokenizer(d)
    assert not tok.chat_template
    return tok


def _text(cfg_dict, tok, system=None) -> tuple[str, object]:
    cfg, choice = resolve_prompts(from_dict(cfg_dict), tok)
    task = get_task("countdown").with_options(prompt_style=cfg.rollout.prompt_style)
    messages = task.prompt(EXAMPLE)
    if cfg.rollout.system_prompt is not None:
        messages = [{"role": "system", "content": cfg.rollout.system_prompt}, *messages]
    return tok.decode(encode_prompt(tok, messages, cfg.rollout.template)), (cfg, choice)


def test_a_chat_template_means_instruct_the_question_as_the_user_turn(chat_tok):
    text, (cfg, choice) = _text({}, chat_tok)
    body = get_task("countdown").prompt_body(EXAMPLE)
    assert text == f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"  # no transcript, no system turn
    assert (choice.kind, cfg.model.kind, cfg.rollout.prompt_style, cfg.rollout.template) == ("instruct",) * 2 + (
        "question",
        "chat",
    )
    assert "chat template" in choice.describe() and "instruct" in choice.describe()


def test_no_chat_template_means_base_the_released_transcript_as_raw_text(plain_tok):
    text, (cfg, choice) = _text({}, plain_tok)
    body = get_task("countdown").prompt_body(EXAMPLE)
    assert text == PROMPT_PREFIX + body + PROMPT_SUFFIX
    assert (choice.kind, cfg.rollout.prompt_style, cfg.rollout.template) == ("base", "released", "raw")


def test_the_config_says_base_even_when_a_template_ships(chat_tok):
    # Qwen2.5's base checkpoints ship a chat template: the paper configs say model.kind: base
    text, (cfg, choice) = _text({"model": {"kind": "base"}}, chat_tok)
    assert text.startswith(PROMPT_PREFIX) and "<|im_start|>" not in text
    assert choice.reason == "model.kind=base"


def test_rollout_keys_still_override_and_are_recorded(chat_tok, plain_tok):
    text, (cfg, choice) = _text({"model": {"kind": "base"}, "rollout": {"template": "chat"}}, chat_tok)
    assert text.startswith("<|im_start|>user\n" + PROMPT_PREFIX)  # the transcript inside the template, as asked
    assert choice.overridden == ("rollout.template=chat",) and "overridden" in choice.describe()
    text, (cfg, _) = _text({"rollout": {"prompt_style": "compact"}}, plain_tok)
    assert cfg.rollout.template == "raw" and text.endswith(
        "Put the final expression in \\boxed{}, for example \\boxed{(1 + 2) / 3}."
    )


def test_a_system_prompt_only_when_the_config_gives_one(chat_tok):
    text, _ = _text({"rollout": {"system_prompt": "Think, then answer."}}, chat_tok)
    assert text.startswith("<|im_start|>system\nThink, then answer.<|im_end|>\n<|im_start|>user\n")


def test_one_encoder_for_chat_and_raw(chat_tok, plain_tok):
    messages = [{"role": "user", "content": "2+2?"}]
    assert prompt_text(chat_tok, messages, template="raw") == "2+2?"
    assert prompt_text(plain_tok, messages) == "User: 2+2?\nAssistant:"  # chat asked, no template: a plain transcript
    assert (
        encode_prompt(chat_tok, messages)
        == chat_tok(prompt_text(chat_tok, messages), add_special_tokens=False)["input_ids"]
    )
    with pytest.raises(ValueError, match="template must be one of"):
        prompt_text(chat_tok, messages, template="jinja")


def test_paper_configs_declare_a_base_model():
    from pathlib import Path

    from mtgrpo_jax.config import load_config

    root = Path(__file__).resolve().parents[2]
    for name in ("exp1", "exp2", "exp3"):
        cfg = load_config(root / "configs" / "paper" / f"{name}.yaml", [])
        assert cfg.model.kind == "base", name
