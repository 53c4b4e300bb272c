"""Held-out evaluation: accuracy = mean correctness over n samples per prompt at temperature T (the paper:
8 samples at 1.0), per task, with the worst-task and average accuracy, and unbiased pass@k."""

from __future__ import annotations

import jax
import numpy as np

from mtgrpo_jax.rollout import SamplingParams
from mtgrpo_jax.tasks import score_batch
from mtgrpo_jax.train.eval_metrics import pass_at_k


def generate_and_score(trainer, task_index: int, examples: list[dict], *, n: int, temperature: float,
                       max_new_tokens: int, key) -> np.ndarray:
    """Correctness [P, n] of n samples for each example of one task."""
    family = trainer.tasks[task_index].family
    prompts = [trainer.prompt_ids(task_index, ex) for ex in examples]
    params = SamplingParams(n=n, temperature=temperature, max_new_tokens=max_new_tokens,
                            stop_token_ids=trainer._stop_ids())
    out = trainer.rollout.generate(prompts, params, key)  # the sampler chunks by its largest batch bucket
    items = [(family, ex) for ex in examples for _ in range(n)]
    scores, _ = score_batch(items, list(out.texts), workers=trainer.cfg.train.score_workers,
                            timeout_s=trainer.cfg.train.score_timeout_s)
    return np.asarray([s.correct for s in scores], bool).reshape(len(examples), n)


def evaluate_tasks(trainer, key) -> dict:
    cfg = trainer.cfg.eval
    record: dict = {"step": trainer.step, "split": "eval"}
    accs = []
    for k, task in enumerate(trainer.tasks):
        examples = task.eval[: cfg.max_examples] if cfg.max_examples else task.eval
        if not examples:
            continue
        correct = generate_and_score(trainer, k, examples, n=cfg.n, temperature=cfg.temperature,
                                     max_new_tokens=cfg.max_new_tokens or trainer.cfg.rollout.max_new_tokens,
                                     key=jax.random.fold_in(key, k))
        acc = float(correct.mean())
        accs.append(acc)
        record[f"eval/{task.name}/accuracy"] = acc
        for kk in cfg.pass_k:
            if kk <= cfg.n:
                record[f"eval/{task.name}/pass@{kk}"] = float(np.mean([pass_at_k(cfg.n, int(c), kk) for c in correct.sum(1)]))
    if accs:
        record["eval/worst_accuracy"] = float(min(accs))
        record["eval/mean_accuracy"] = float(np.mean(accs))
    return record


def main(argv: list[str], prog: str = "mtgrpo eval") -> int:
    from mtgrpo_jax.train.eval_cli import eval_main

    return eval_main(argv, prog)
