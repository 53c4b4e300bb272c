"""`mtgrpo generate`: sample completions from a model with the rollout engine.

Without `--model` it runs the bundled tiny Qwen2-type config with random weights and the bundled
tiny tokenizer, so the command works on a fresh checkout (the output is gibberish by design)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_PROMPTS = ("Using the numbers 3, 5 and 7, make 22.", "Who owns the zebra?")


def _load(model_dir: str | None, dtype: str, seed: int):
    import jax.numpy as jnp
    from flax import nnx

    from mtgrpo_jax.models import Transformer, load_pretrained, load_tokenizer, tiny_config

    if model_dir is None:
        model = Transformer(tiny_config(), rngs=nnx.Rngs(seed), dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
        return model, load_tokenizer()
    path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {model_dir}: no config.json in that directory")
    has_tokenizer = (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    return load_pretrained(path, dtype=dtype), load_tokenizer(path if has_tokenizer else None)


def _buckets(lengths: list[int], batch: int):
    from mtgrpo_jax.rollout import Buckets

    longest = max(lengths)
    return Buckets(prompt_lengths=(max(16, 1 << (longest - 1).bit_length()),), batch_sizes=(batch,))


def generate_main(argv: list[str] | None = None, prog: str = "mtgrpo generate") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF-format model directory (default: bundled tiny random-init model)")
    ap.add_argument(
        "--prompt", action="append", default=None, help="a user message (repeatable); the chat template is applied"
    )
    ap.add_argument("--n", type=int, default=2, help="samples per prompt")
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0, help="0 = off")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json", action="store_true", help="print one JSON object per completion")
    args = ap.parse_args(argv)

    from mtgrpo_jax.rollout import RolloutEngine, SamplingParams

    try:
        params = SamplingParams(
            n=args.n,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_new_tokens=args.max_new_tokens,
        )
    except ValueError as e:
        ap.error(str(e))
    import jax

    from mtgrpo_jax.models import encode_prompt

    try:
        model, tokenizer = _load(args.model, args.dtype, args.seed)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    if any(not p.strip() for p in prompts):
        ap.error("--prompt must not be empty")
    ids = [encode_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    engine = RolloutEngine(model, tokenizer, _buckets([len(i) for i in ids], len(ids)))
    out = engine.generate(ids, params, jax.random.key(args.seed))
    for row in range(len(out.texts)):
        i, j = divmod(row, params.n)
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": prompts[i],
                        "sample": j,
                        "text": out.texts[row],
                        "tokens": out.tokens[row][out.mask[row]].tolist(),
                        "finish_reason": out.finish_reason[row],
                        "logprob": float(out.logprobs[row][out.mask[row]].sum()),
                    }
                )
            )
        else:
            if j == 0:
                print(f"=== prompt {i}: {prompts[i]!r}")
            print(
                f"--- sample {j} ({out.finish_reason[row]}, {out.lengths[row]} tokens, "
                f"logprob {out.logprobs[row][out.mask[row]].sum():.2f})"
            )
            print(out.texts[row])
    return 0


if __name__ == "__main__":
    sys.exit(generate_main())
