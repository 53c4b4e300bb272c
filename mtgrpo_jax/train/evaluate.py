"""Held-out evaluation: accuracy = mean correctness over n samples per prompt at temperature T (the paper:
8 samples at 1.0), per task, with the worst-task and average accuracy, and unbiased pass@k."""

from __future__ import annotations

import jax
import numpy as np

from mtgrpo_jax.config import EvalCfg, TrainCfg
from mtgrpo_jax.tasks import score_batch
from mtgrpo_jax.train.eval_metrics import eval_record


def sample_correctness(
    policy,
    task,
    examples: list[dict],
    *,
    n: int,
    temperature: float,
    max_new_tokens: int | None,
    key,
    score_workers: int = 4,
    score_timeout_s: float = 2.0,
    params=None,
) -> np.ndarray:
    """Correctness [P, n] of n samples for each example of one task (with `params`, see `Policy.generate`)."""
    prompts = [policy.prompt_ids(task, ex) for ex in examples]
    out = policy.generate(
        prompts, key, n=n, temperature=temperature, max_new_tokens=max_new_tokens, top_p=1.0, top_k=0, params=params
    )
    items = [ex for ex in examples for _ in range(n)]
    scores, _ = score_batch(items, list(out.texts), workers=score_workers, timeout_s=score_timeout_s, tasks=task)
    return np.asarray([s.correct for s in scores], bool).reshape(len(examples), n)


def evaluate_tasks(policy, tasks, cfg: EvalCfg, train_cfg: TrainCfg, *, step: int, key, params=None) -> dict:
    """One evaluation record: eval/<task>/accuracy and pass@k, eval/worst_accuracy, eval/mean_accuracy."""
    correct_by_task = {}
    for k, run_task in enumerate(tasks):
        examples = run_task.eval[: cfg.max_examples] if cfg.max_examples else run_task.eval
        if examples:
            correct_by_task[run_task.name] = sample_correctness(
                policy,
                run_task.task,
                examples,
                n=cfg.n,
                temperature=cfg.temperature,
                max_new_tokens=cfg.max_new_tokens,
                key=jax.random.fold_in(key, k),
                score_workers=train_cfg.score_workers,
                score_timeout_s=train_cfg.score_timeout_s,
                params=params,
            )
    if not correct_by_task:
        return {"step": step, "split": "eval"}
    return {"step": step, **eval_record(correct_by_task, [k for k in cfg.pass_k if k <= cfg.n])}
