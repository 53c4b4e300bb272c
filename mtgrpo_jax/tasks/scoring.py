"""Scoring many completions at once, host side, in a thread pool with a per-item time bound.

Threads are enough because every built-in verifier bounds its own work by input limits (the box
reader, the countdown parser and the math normaliser read at most a few kilobytes). The time bound
is the safety net for user tasks: an item whose verifier raises, runs past `timeout_s`, or has not
finished when the batch's deadline passes scores 0, and is counted in the stats. A thread cannot be
killed, so a verifier that truly hangs keeps its thread; the pool is not waited on in that case.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from mtgrpo_jax.tasks.base import ZERO_SCORE, BaseTask, Score, Task
from mtgrpo_jax.tasks.registry import get_task


@dataclasses.dataclass
class ScoreStats:
    """What a batch of scoring did; `as_dict` gives flat metrics."""

    n: int = 0
    errors: int = 0
    timeouts: int = 0
    seconds: float = 0.0
    max_item_seconds: float = 0.0
    mean_reward: float = 0.0
    accuracy: float = 0.0
    format_rate: float = 0.0

    def as_dict(self, prefix: str = "reward/") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in dataclasses.asdict(self).items()}


def _score_one(task: Task, text: Any, example: Mapping[str, Any], timeout_s: float) -> tuple[Score, str, float]:
    start = time.perf_counter()
    try:
        if not isinstance(text, str):
            raise TypeError(f"completion must be str, got {type(text).__name__}")
        if isinstance(task, BaseTask):
            score, status = task.score_with_status(text, example)
        else:
            score, status = task.score(text, example), "ok"
            score = Score(float(score.reward), bool(score.correct), bool(score.formatted))
    except Exception:
        score, status = ZERO_SCORE, "error"
    elapsed = time.perf_counter() - start
    if elapsed > timeout_s:
        return ZERO_SCORE, "timeout", elapsed
    return score, status, elapsed


def _task_for(example: Mapping[str, Any], tasks: Task | Mapping[str, Task] | None) -> Task:
    if tasks is not None and not isinstance(tasks, Mapping):
        return tasks
    name = example.get("task")
    if tasks is not None and name in tasks:
        return tasks[name]
    if name is None:
        raise ValueError("example has no 'task' field; pass tasks=...")
    return get_task(name)


def score_batch(
    items: Sequence[Mapping[str, Any]],
    texts: Sequence[str],
    *,
    workers: int = 8,
    timeout_s: float = 1.0,
    tasks: Task | Mapping[str, Task] | None = None,
) -> tuple[list[Score], ScoreStats]:
    """Score `texts[i]` against `items[i]` with the item's task (`get_task(item["task"])`, or
    `tasks`: one Task for all, or a mapping name -> Task). `workers=0` scores inline.

    Returns the scores in order and a ScoreStats. Never raises for bad completions; raises
    ValueError only for mismatched inputs or an unknown task name.
    """
    if len(items) != len(texts):
        raise ValueError(f"score_batch: {len(items)} items but {len(texts)} texts")
    if not timeout_s > 0:
        raise ValueError(f"score_batch: timeout_s must be positive, got {timeout_s}")
    start = time.perf_counter()
    resolved = [_task_for(item, tasks) for item in items]
    results: list[tuple[Score, str, float]] = []
    n = len(items)
    if workers <= 0 or n <= 1:
        results = [_score_one(t, x, e, timeout_s) for t, x, e in zip(resolved, texts, items)]
    else:
        workers = min(workers, n)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verifier")
        futures = [pool.submit(_score_one, t, x, e, timeout_s) for t, x, e in zip(resolved, texts, items)]
        # Every item gets timeout_s of a worker's time; waves of `workers` items run one after another.
        deadline = start + timeout_s * (math.ceil(n / workers) + 1)
        hung = False
        for future in futures:
            try:
                results.append(future.result(timeout=max(0.0, deadline - time.perf_counter())))
            except concurrent.futures.TimeoutError:
                hung = True
                results.append((ZERO_SCORE, "timeout", timeout_s))
        pool.shutdown(wait=not hung, cancel_futures=True)
    scores = [r[0] for r in results]
    stats = ScoreStats(
        n=n,
        errors=sum(r[1] == "error" for r in results),
        timeouts=sum(r[1] == "timeout" for r in results),
        seconds=time.perf_counter() - start,
        max_item_seconds=max((r[2] for r in results), default=0.0),
        mean_reward=sum(s.reward for s in scores) / n if n else 0.0,
        accuracy=sum(s.correct for s in scores) / n if n else 0.0,
        format_rate=sum(s.formatted for s in scores) / n if n else 0.0,
    )
    return scores, stats
