"""The per-task signals of one training step, from the step's groups: pure NumPy, no device, no model.

    stats = step_signals(num_tasks, generated, kept, counts=result.counts, ...)

What each weighting reads: J_k (`reward`, or `accuracy` for the released optimizer), the released
optimizer's per-round accuracies (`round_accuracy`), SEC's mean |advantage| over the kept groups
(`abs_advantage`), and whether a task was generated at all (`present`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class GroupRecord(NamedTuple):
    """What the signals need of one generated group (prompt x G completions)."""

    task_id: int
    round: int  # the generation round of the step that produced it (0: the first)
    rewards: np.ndarray  # [G]
    correct: np.ndarray  # [G] bool
    accepted: bool  # survived the zero-gradient filter


class StepSignals(NamedTuple):
    """Per task [K] (round_accuracy [R, K]); NaN-free except round_accuracy, which is NaN where a round
    generated no group of the task."""

    reward: np.ndarray  # mean reward over every group generated this step (before filtering)
    accuracy: np.ndarray  # mean over those groups of the fraction of correct completions
    zero_grad_rate: np.ndarray  # fraction of generated groups whose rewards are all equal (no advantage)
    filtered_rate: np.ndarray  # fraction of generated groups rejected by the zero-gradient filter
    abs_advantage: np.ndarray  # mean |advantage| over the kept groups (SEC's learning-progress proxy)
    generated: np.ndarray  # groups generated (every round)
    kept: np.ndarray  # groups in the training batch
    share: np.ndarray  # kept / total kept
    present: np.ndarray  # bool: generated at least once this step
    round_accuracy: np.ndarray  # [R, K]: `accuracy` per generation round (the released reward EMA's input)


def step_signals(
    num_tasks: int,
    generated: Sequence[GroupRecord],
    kept_task_ids: Sequence[int],
    kept_abs_advantage: Sequence[float],
    *,
    groups_generated: np.ndarray | None = None,
    accepted_generated: np.ndarray | None = None,
    kept_counts: np.ndarray | None = None,
) -> StepSignals:
    """The step's per-task signals. J_k is taken over every group generated (before filtering: the
    filter keeps only mixed groups, which says little about how good the policy is). The optional
    counts are the sampler result's own (`SampleResult.groups_generated`, `.accepted_generated`,
    `.counts`); they must agree with the records, which is checked."""
    k = int(num_tasks)
    if k < 1:
        raise ValueError(f"num_tasks={num_tasks!r} must be positive")
    task = np.asarray([g.task_id for g in generated], np.int64)
    if task.size and (task.min() < 0 or task.max() >= k):
        raise ValueError(f"step_signals: task ids must lie in [0, {k}), got {sorted(set(task.tolist()))}")
    rounds = np.asarray([g.round for g in generated], np.int64)
    mean_reward = np.asarray([np.mean(g.rewards) for g in generated], np.float64)
    mean_correct = np.asarray([np.mean(np.asarray(g.correct, np.float64)) for g in generated], np.float64)
    all_equal = np.asarray([np.ptp(g.rewards) == 0 for g in generated], np.float64)
    accepted = np.asarray([bool(g.accepted) for g in generated], np.float64)

    gen = np.bincount(task, minlength=k).astype(np.float64)

    def per_task_mean(values, ids=task, counts=gen):
        total = np.bincount(ids, weights=values, minlength=k) if len(values) else np.zeros(k)
        return np.where(counts > 0, total / np.maximum(counts, 1), 0.0)

    kept_ids = np.asarray(kept_task_ids, np.int64)
    kept = np.bincount(kept_ids, minlength=k).astype(np.float64)
    abs_adv = per_task_mean(np.asarray(kept_abs_advantage, np.float64), kept_ids, kept)
    for name, theirs, ours in (
        ("groups_generated", groups_generated, gen),
        ("accepted_generated", accepted_generated, np.bincount(task, weights=accepted, minlength=k)),
        ("counts", kept_counts, kept),
    ):
        if theirs is not None and not np.array_equal(np.asarray(theirs, np.float64), ours):
            raise ValueError(
                f"step_signals: the sampler's {name} {np.asarray(theirs).tolist()} disagree with the "
                f"groups' {ours.astype(int).tolist()}"
            )

    n_rounds = int(rounds.max()) + 1 if rounds.size else 1
    round_acc = np.full((n_rounds, k), np.nan)
    for r in range(n_rounds):
        sel = rounds == r
        n = np.bincount(task[sel], minlength=k).astype(np.float64)
        acc = per_task_mean(mean_correct[sel], task[sel], n)
        round_acc[r] = np.where(n > 0, acc, np.nan)

    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    return StepSignals(
        reward=f32(per_task_mean(mean_reward)),
        accuracy=f32(per_task_mean(mean_correct)),
        zero_grad_rate=f32(per_task_mean(all_equal)),
        filtered_rate=f32(np.where(gen > 0, 1.0 - per_task_mean(accepted), 0.0)),
        abs_advantage=f32(abs_adv),
        generated=f32(gen),
        kept=f32(kept),
        share=f32(kept / max(kept.sum(), 1.0)),
        present=gen > 0,
        round_accuracy=f32(round_acc),
    )
