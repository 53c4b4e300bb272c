"""Builds the bundled tiny tokenizer (`mtgrpo_jax/assets/tiny_tokenizer`).

A byte-level BPE with a 2048-token vocabulary, trained with the `tokenizers` library on text that looks
like what the tiny demo model will read and write: reasoning-gym countdown / zebra_puzzles / arc_1d
questions and answers, R1-Zero style prompts with <think>/<answer> tags, `\\boxed{}` answers, digits
and arithmetic. Digits are split one per token (as in Qwen) so numbers compose instead of memorising
multi-digit chunks. Special tokens: <|endoftext|> (id 0, eos and pad), <|im_start|>, <|im_end|>, with a
ChatML chat template like Qwen's. Byte-level means any text round-trips, corpus or not.

Regenerate with:  python -m mtgrpo_jax.models.build_tokenizer [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenizer split (single digits), applied before the byte-level mapping.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
R1_ZERO_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>.\n"
    "User: {question}\nAssistant: <think>"
)
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "assets" / "tiny_tokenizer"


# The three demo tasks, then text-rich ones that give the merges enough ordinary English and math words
# (the demo tasks alone are too repetitive to fill 2048 tokens). zebra_puzzles is slow to generate.
CORPUS_TASKS = {
    "countdown": 1.0,
    "zebra_puzzles": 0.3,
    "arc_1d": 1.0,
    "gsm_symbolic": 1.0,
    "family_relationships": 0.5,
    "sentence_reordering": 0.5,
    "syllogism": 0.5,
    "basic_arithmetic": 0.5,
}


def build_corpus(n_per_task: int = 400, seed: int = 0) -> list[str]:
    """Deterministic training text (reasoning-gym is generated locally; nothing is downloaded)."""
    import reasoning_gym

    rng = random.Random(seed)
    texts: list[str] = []
    for task, share in CORPUS_TASKS.items():
        for item in reasoning_gym.create_dataset(task, size=max(1, int(n_per_task * share)), seed=seed):
            q, a = item["question"], str(item["answer"])
            texts.append(R1_ZERO_PROMPT.format(question=q) + f" Let me work it out. </think> <answer>{a}</answer>")
            texts.append(
                f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
                f"<think>\nThe answer is {a}.\n</think>\n\\boxed{{{a}}}<|im_end|>"
            )
    ops = ["+", "-", "*", "/"]
    for _ in range(3000):
        x, y = rng.randint(0, 999), rng.randint(1, 99)
        op = rng.choice(ops)
        value = {"+": x + y, "-": x - y, "*": x * y, "/": round(x / y, 3)}[op]
        texts.append(f"{x} {op} {y} = {value}. ({x}{op}{y}) so the answer is \\boxed{{{value}}}.")
    rng.shuffle(texts)
    return texts


def build_tokenizer(out_dir: str | Path = DEFAULT_OUT, *, n_per_task: int = 400, seed: int = 0) -> Path:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(build_corpus(n_per_task, seed), trainer=trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"trained vocab has {tok.get_vocab_size()} tokens, wanted {VOCAB_SIZE}; grow the corpus")

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    # The class name every transformers version knows (v5 maps it to its TokenizersBackend).
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--n-per-task", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tokenizer(args.out, n_per_task=args.n_per_task, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
