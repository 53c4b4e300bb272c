"""The task-weight optimizer interface and the signal hygiene every optimizer shares.

An optimizer is a `TaskWeightOptimizer` of three pure functions, optax-style:

    state = opt.init(num_tasks)                 # num_tasks: a Python int
    weights, state = opt.update(signals, state) # weights z [K] on the simplex, for the NEXT step
    weights = opt.weights(state)                # the weights a state stands for (init: before any update)

States are NamedTuples of arrays, so `update` jits, vmaps over independent runs and checkpoints.

Signals of a task that is absent from the batch (``present[k]`` False) or that are not finite are
never read: they are replaced by 0 before any arithmetic (NaN * 0 is NaN, so masking a product would
not be enough), the task is treated as absent, and the state's ``rejected[k]`` counter goes up by one
for every update whose signals for a *present* task k were non-finite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class TaskSignals(NamedTuple):
    """Per-task signals of one training step, each ``[K]``.

    reward:        J_k, the task's reward on the batch (what exactly is the trainer's contract with the
                   chosen optimizer: see `mt_grpo`).
    improvement:   I_k, the change of task k's objective caused by the step's policy update: ``[K]``, or
                   ``[M, K]`` with one row per policy mini-batch (the paper's optimizer sums the rows,
                   the released one makes one weight step per row).
    abs_advantage: mean |advantage| over task k's tokens (SEC's learning-progress proxy).
    present:       bool, whether task k had rows in the batch; None means every task did.
    round_reward:  ``[R, K]``: task k's reward in each generation round of the step (resampling rounds
                   included), NaN where the round generated no group of task k. Read only by the
                   released optimizer, whose reward EMA moves once per round.

    Fields an optimizer does not use may be None.
    """

    reward: Any = None
    improvement: Any = None
    abs_advantage: Any = None
    present: Any = None
    round_reward: Any = None


class TaskWeightOptimizer(NamedTuple):
    init: Callable[[int], Any]
    update: Callable[[TaskSignals, Any], tuple[jax.Array, Any]]
    weights: Callable[[Any], jax.Array]


def check_num_tasks(num_tasks) -> int:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks={num_tasks!r} must be a positive Python int")
    return num_tasks


def check_hyper(
    name: str, value, *, low: float | None = None, high: float | None = None, low_open: bool = False
) -> None:
    """Validate a hyperparameter when it is a concrete number (traced values, e.g. under vmap over
    runs, are the caller's responsibility)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name}={value} must be finite")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name}={value} must be {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        raise ValueError(f"{name}={value} must be <= {high}")


def accept_signals(
    signals: TaskSignals, fields: tuple[str, ...], num_tasks: int, owner: str, optional: tuple[str, ...] = ()
):
    """(ok [K] bool, rejected [K] bool, cleaned {field: [K] float32}) for the fields an optimizer reads.

    ``ok`` = present and every read field finite; cleaned values are 0 wherever not ok. Fields in
    ``optional`` may be None and then read as 0.
    """
    if not isinstance(signals, TaskSignals):
        raise ValueError(f"{owner}.update takes a TaskSignals, got {type(signals).__name__}")
    present = signals.present
    if present is None:
        present = jnp.ones((num_tasks,), jnp.bool_)
    present = jnp.asarray(present)
    if present.shape != (num_tasks,):
        raise ValueError(f"TaskSignals.present must be [{num_tasks}], got shape {present.shape}")
    present = present.astype(jnp.bool_)
    raw = {}
    for name in fields + optional:
        value = getattr(signals, name)
        if value is None:
            if name in optional:
                continue
            raise ValueError(f"{owner} needs TaskSignals.{name}, got None")
        value = jnp.asarray(value)
        if value.shape != (num_tasks,):
            raise ValueError(f"TaskSignals.{name} must be [{num_tasks}], got shape {value.shape}")
        raw[name] = value.astype(jnp.promote_types(value.dtype, jnp.float32))
    finite = jnp.ones((num_tasks,), jnp.bool_)
    for value in raw.values():
        finite = finite & jnp.isfinite(value)
    ok = present & finite
    cleaned = {name: jnp.where(ok, value, 0.0).astype(jnp.float32) for name, value in raw.items()}
    for name in optional:
        cleaned.setdefault(name, jnp.zeros((num_tasks,), jnp.float32))
    return ok, present & ~finite, cleaned


def reward_ema_update(reward, ok, ema, seen, decay):
    """EMA of the reward for present tasks, seeded by the first observation; absent tasks keep theirs.

    Returns (the reward each task should be scored with, new ema, new seen). Without ``decay`` the
    batch reward is used as is and the EMA fields are passed through untouched.
    """
    if decay is None:
        return reward, ema, seen
    updated = jnp.where(seen, decay * ema + (1.0 - decay) * reward, reward)
    new_ema = jnp.where(ok, updated, ema)
    return new_ema, new_ema, seen | ok


def present_weighted_mean(score, z, ok):
    """sum_{k present} z_k s_k / sum_{k present} z_k: the score imputed to absent tasks, which makes
    the paper's gradient z_k (s_k - sum_j z_j s_j) exactly 0 for them."""
    zp = jnp.where(ok, z, 0.0)
    return jnp.sum(zp * score) / jnp.maximum(jnp.sum(zp), jnp.finfo(z.dtype).tiny)
