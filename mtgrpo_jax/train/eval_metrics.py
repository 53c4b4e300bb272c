"""Evaluation arithmetic in plain NumPy: pass@k, per-task / worst-task / average accuracy, the average
relative change against a baseline, and how many steps (and hours) a run took to reach worst-task
accuracy thresholds.

Kept free of JAX so `mtgrpo eval`, the report and the trainer's evaluation share one definition of each
number, and each can be checked against a brute-force reference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from mtgrpo_jax.train.metrics import EVAL_SPLIT, per_task

# ----------------------------------------------------------------------------------------------------
# pass@k and accuracy
# ----------------------------------------------------------------------------------------------------


def pass_at_k(n: Any, c: Any, k: int) -> np.ndarray:
    """Unbiased pass@k (Chen et al. 2021): the chance that k of the n samples, drawn without
    replacement, contain at least one of the c correct ones, 1 - C(n-c, k) / C(n, k).

    The binomial ratio is evaluated as the product prod_{i=n-c+1}^{n} (1 - k/i), in log space and with
    expm1, so it neither overflows for large n nor loses precision when pass@k is tiny. `n` and `c`
    broadcast against each other; the result is float64 with their broadcast shape.
    """
    n_arr, c_arr = np.broadcast_arrays(np.asarray(n), np.asarray(c))
    if n_arr.dtype.kind not in "iu" or c_arr.dtype.kind not in "iub":
        raise ValueError(f"pass_at_k: n and c must be integers, got {n_arr.dtype} and {c_arr.dtype}")
    n_arr = n_arr.astype(np.int64)
    c_arr = c_arr.astype(np.int64)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"pass_at_k: k must be a positive integer, got {k!r}")
    if np.any(c_arr < 0) or np.any(c_arr > n_arr):
        raise ValueError("pass_at_k: need 0 <= c <= n for every entry")
    if np.any(n_arr < k):
        raise ValueError(f"pass_at_k: k={k} exceeds the number of samples n={int(n_arr.min())}")
    # Each distinct (n, c) pair once (an eval has one n and at most n + 1 distinct c). The log of the
    # product is summed term by term over (n-c, n] rather than as a difference of running sums, which
    # would cancel digits when pass@k is small.
    pairs, inverse = np.unique(np.stack([n_arr.ravel(), c_arr.ravel()], axis=1), axis=0, return_inverse=True)
    values = np.ones(len(pairs), dtype=np.float64)
    for j, (n_j, c_j) in enumerate(pairs):
        if n_j - c_j >= k:  # otherwise every k-subset holds a correct sample
            i = np.arange(n_j - c_j + 1, n_j + 1, dtype=np.float64)
            values[j] = -np.expm1(np.sum(np.log1p(-k / i)))
    return values[inverse.reshape(-1)].reshape(n_arr.shape)


def _as_correctness(correct: Any, name: str = "correct") -> np.ndarray:
    """[P, n] boolean correctness. Rewards such as 1.0 / 0.1 / 0 must be thresholded by the caller: a
    partial-credit value is not a correct answer, and guessing the cut here would hide that choice."""
    arr = np.asarray(correct)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty [prompts, samples] array, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype.kind not in "iuf" or not np.all((arr == 0) | (arr == 1)):
        raise ValueError(f"{name}: correctness must be boolean or 0/1 (threshold rewards first)")
    return arr.astype(bool)


def pass_at_k_from_correct(correct: Any, k: int) -> np.ndarray:
    """Per-prompt unbiased pass@k from a [P, n] correctness array."""
    arr = _as_correctness(correct)
    return pass_at_k(np.full(arr.shape[0], arr.shape[1]), arr.sum(axis=1), k)


def accuracy(correct: Any) -> float:
    """Mean correctness over prompts and samples: the paper's accuracy (n samples per prompt at T)."""
    return float(_as_correctness(correct).mean())


def task_accuracies(correct_by_task: Mapping[str, Any]) -> dict[str, float]:
    return {name: accuracy(_as_correctness(c, name)) for name, c in correct_by_task.items()}


class TaskSummary(NamedTuple):
    worst_accuracy: float
    mean_accuracy: float
    worst_task: str


def summarize(accuracies: Mapping[str, float]) -> TaskSummary:
    """Worst-task and average (unweighted mean over tasks) accuracy; NaN tasks are refused."""
    if not accuracies:
        raise ValueError("summarize: no tasks given")
    for name, value in accuracies.items():
        if not np.isfinite(value):
            raise ValueError(f"summarize: accuracy of task {name!r} is not finite ({value})")
    worst_task = min(accuracies, key=lambda name: accuracies[name])
    return TaskSummary(float(accuracies[worst_task]), float(np.mean(list(accuracies.values()))), worst_task)


def eval_record(correct_by_task: Mapping[str, Any], ks: Sequence[int] = ()) -> dict[str, Any]:
    """An evaluation record in the metrics schema ("split": "eval", `eval/<name>/accuracy`,
    `eval/<name>/pass@k`, `eval/worst_accuracy`, `eval/mean_accuracy`) from per-task correctness."""
    record: dict[str, Any] = {"split": EVAL_SPLIT}
    accs = {}
    for name, correct in correct_by_task.items():
        arr = _as_correctness(correct, name)
        accs[name] = float(arr.mean())
        record[f"eval/{name}/accuracy"] = accs[name]
        for k in ks:
            record[f"eval/{name}/pass@{k}"] = float(pass_at_k_from_correct(arr, k).mean())
    summary = summarize(accs)
    record["eval/worst_accuracy"] = summary.worst_accuracy
    record["eval/mean_accuracy"] = summary.mean_accuracy
    return record


# ----------------------------------------------------------------------------------------------------
# Against a baseline
# ----------------------------------------------------------------------------------------------------


class RelativeChange(NamedTuple):
    mean: float  # mean over the counted tasks of (acc - base) / base; NaN if no task counted
    per_task: dict[str, float]  # every task; inf / nan where the baseline is 0
    skipped: list[str]  # tasks left out of the mean because their baseline accuracy is 0


def relative_change(
    accuracies: Mapping[str, float], baseline: Mapping[str, float], *, zero_base: str = "skip"
) -> RelativeChange:
    """Average relative change of per-task accuracy against a baseline: mean_k (acc_k - base_k) / base_k.

    A task whose baseline accuracy is 0 has no finite relative change. zero_base says what to do:
    "skip" leaves it out of the mean and lists it in `skipped` (its per-task entry is +inf if it
    improved, 0.0 if it stayed at 0); "raise" refuses. The tasks of both sides must match.
    """
    if zero_base not in ("skip", "raise"):
        raise ValueError(f"zero_base must be 'skip' or 'raise', got {zero_base!r}")
    missing = sorted(set(baseline) ^ set(accuracies))
    if missing:
        raise ValueError(f"relative_change: tasks not on both sides: {', '.join(missing)}")
    per: dict[str, float] = {}
    counted: list[float] = []
    skipped: list[str] = []
    for name in accuracies:
        acc, base = float(accuracies[name]), float(baseline[name])
        if base < 0 or acc < 0:
            raise ValueError(f"relative_change: negative accuracy for task {name!r}")
        if base == 0.0:
            if zero_base == "raise":
                raise ValueError(f"relative_change: baseline accuracy of task {name!r} is 0")
            per[name] = math.inf if acc > 0 else 0.0
            skipped.append(name)
            continue
        per[name] = (acc - base) / base
        counted.append(per[name])
    mean = float(np.mean(counted)) if counted else math.nan
    return RelativeChange(mean, per, skipped)


# ----------------------------------------------------------------------------------------------------
# A run's evaluation history
# ----------------------------------------------------------------------------------------------------


class EvalHistory(NamedTuple):
    steps: np.ndarray  # [E] int, increasing
    elapsed_s: np.ndarray  # [E] float, NaN where unknown
    accuracy: dict[str, np.ndarray]  # task -> [E] float, NaN where the task was not evaluated
    worst: np.ndarray  # [E] worst-task accuracy
    mean: np.ndarray  # [E] average accuracy


def _num(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
        return float(value)
    return math.nan


def eval_history(records: Sequence[Mapping[str, Any]]) -> EvalHistory:
    """The evaluation records of a run as arrays over evaluation steps.

    Worst/mean come from `eval/worst_accuracy` / `eval/mean_accuracy` where recorded and are otherwise
    computed from the per-task accuracies. If a step was evaluated twice (a run resumed without its
    history truncated), the later record wins.
    """
    by_step: dict[int, Mapping[str, Any]] = {}
    for rec in records:
        if rec.get("split") == EVAL_SPLIT and isinstance(rec.get("step"), int):
            by_step[rec["step"]] = rec
    steps = sorted(by_step)
    names: list[str] = []
    for s in steps:
        for name in per_task(by_step[s], "accuracy", prefix="eval/"):
            if name not in names:
                names.append(name)
    acc = {name: np.full(len(steps), np.nan) for name in names}
    worst = np.full(len(steps), np.nan)
    mean = np.full(len(steps), np.nan)
    elapsed = np.full(len(steps), np.nan)
    for j, s in enumerate(steps):
        rec = by_step[s]
        for name, value in per_task(rec, "accuracy", prefix="eval/").items():
            acc[name][j] = _num(value)
        row = np.array([acc[n][j] for n in names]) if names else np.array([])
        finite = row[np.isfinite(row)]
        worst[j] = _num(rec.get("eval/worst_accuracy"))
        if not np.isfinite(worst[j]) and finite.size:
            worst[j] = finite.min()
        mean[j] = _num(rec.get("eval/mean_accuracy"))
        if not np.isfinite(mean[j]) and finite.size:
            mean[j] = finite.mean()
        elapsed[j] = _num(rec.get("elapsed_s"))
    return EvalHistory(np.array(steps, dtype=np.int64), elapsed, acc, worst, mean)


class ThresholdHit(NamedTuple):
    step: int
    hours: float  # run time (elapsed_s / 3600) at that evaluation; NaN when not recorded


def steps_to_thresholds(
    records: Sequence[Mapping[str, Any]] | EvalHistory, thresholds: Sequence[float]
) -> dict[float, ThresholdHit | None]:
    """For each threshold, the first evaluation at which worst-task accuracy reached it (>=), or None.

    This is the paper's sample-efficiency view of robustness: how long until the weakest task is at
    least this good. Hours come from the record's elapsed_s (run time, resumes included).
    """
    history = records if isinstance(records, EvalHistory) else eval_history(records)
    out: dict[float, ThresholdHit | None] = {}
    for threshold in thresholds:
        threshold = float(threshold)
        if not np.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold}")
        reached = np.flatnonzero(np.nan_to_num(history.worst, nan=-np.inf) >= threshold)
        if reached.size == 0:
            out[threshold] = None
        else:
            j = int(reached[0])
            out[threshold] = ThresholdHit(int(history.steps[j]), float(history.elapsed_s[j] / 3600.0))
    return out
