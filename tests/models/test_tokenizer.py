"""The bundled tiny tokenizer and chat formatting."""

import shutil
from pathlib import Path

import pytest

from mtgrpo_jax.models import load_tokenizer, prompt_text, tiny_config
from mtgrpo_jax.models.tokenizer import TINY_TOKENIZER_DIR


def test_bundled_tokenizer_matches_tiny_model():
    tok = load_tokenizer()
    assert len(tok) == tiny_config().vocab_size == 2048
    assert tok.eos_token == tok.pad_token == "<|endoftext|>" and tok.eos_token_id == 0
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert tok.padding_side == "left"
    assert set(tiny_config().eos_token_ids) == {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    assert sum(f.stat().st_size for f in Path(TINY_TOKENIZER_DIR).parent.rglob("*") if f.is_file()) < 1_000_000


def test_round_trip_and_digit_split():
    tok = load_tokenizer()
    text = "Calculate 309 using 6, 61, 94, 4.\n<think> 94*4 - 61 - 6 = 309 </think> <answer>\\boxed{94*4 - 61 - 6}</answer> naïve ✓"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert [tok.decode([i]) for i in tok("309")["input_ids"]] == ["3", "0", "9"]
    prose = "A conversation between User and Assistant. The person who loves a carnations arrangement is in the first house."
    assert len(tok(prose)["input_ids"]) < len(prose) / 3  # merges learned from the corpus actually compress it
    batch = tok(["a b c", "a"], padding=True)
    assert batch["input_ids"][1][0] == tok.pad_token_id and batch["attention_mask"][1][0] == 0


def test_chat_template_and_plain_fallback(tmp_path):
    tok = load_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    text = prompt_text(tok, messages)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok(text)["input_ids"][0] == 1
    assert not prompt_text(tok, messages, add_generation_prompt=False).endswith("assistant\n")

    plain_dir = tmp_path / "plain"
    shutil.copytree(TINY_TOKENIZER_DIR, plain_dir)
    (plain_dir / "chat_template.jinja").unlink()
    plain = load_tokenizer(plain_dir)
    assert not plain.chat_template
    assert prompt_text(plain, messages) == "System: Be brief.\nUser: 2+2?\nAssistant:"
    with pytest.raises(ValueError, match="needs 'role' and 'content'"):
        prompt_text(tok, [{"text": "hi"}])
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path)


@pytest.mark.slow
def test_build_script_regenerates_the_bundled_tokenizer(tmp_path):
    from mtgrpo_jax.models.build_tokenizer import build_tokenizer

    out = build_tokenizer(tmp_path / "tok")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (TINY_TOKENIZER_DIR / name).read_bytes(), name
