"""The paper's baseline task weightings: SEC (self-evolving curriculum), fixed weights and uniform."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtgrpo_jax.weighting.base import (
    TaskSignals,
    TaskWeightOptimizer,
    accept_signals,
    check_hyper,
    check_num_tasks,
)


class SECState(NamedTuple):
    q: jax.Array  # [K] running learning-progress estimate, starts at 0
    rejected: jax.Array  # [K] int32
    step: jax.Array  # int32


def sec(alpha: float = 0.5, temperature: float = 0.2) -> TaskWeightOptimizer:
    """Self-evolving curriculum (Chen et al. 2025): a bandit whose value of task k is the mean absolute
    advantage of its rollouts, a proxy for how much there is left to learn on it.

    For present tasks Q_k <- (1 - alpha) Q_k + alpha * mean|A_k|; absent tasks keep Q_k unchanged
    (the released code instead decays an absent task's Q towards 0). z = softmax(Q / temperature).
    Needs ``TaskSignals.abs_advantage``.
    """
    check_hyper("alpha", alpha, low=0.0, high=1.0)
    check_hyper("temperature", temperature, low=0.0, low_open=True)

    def init(num_tasks: int) -> SECState:
        k = check_num_tasks(num_tasks)
        return SECState(jnp.zeros((k,), jnp.float32), jnp.zeros((k,), jnp.int32), jnp.zeros((), jnp.int32))

    def update(signals: TaskSignals, state: SECState):
        k = state.q.shape[0]
        ok, rejected, sig = accept_signals(signals, ("abs_advantage",), k, "sec")
        q = jnp.where(ok, (1.0 - alpha) * state.q + alpha * sig["abs_advantage"], state.q)
        new = SECState(q, state.rejected + rejected.astype(jnp.int32), state.step + jnp.any(ok).astype(jnp.int32))
        return weights(new), new

    def weights(state: SECState):
        return jax.nn.softmax(state.q / temperature)

    return TaskWeightOptimizer(init, update, weights)


class StaticState(NamedTuple):
    weights: jax.Array  # [K], fixed


def static(weights) -> TaskWeightOptimizer:
    """Fixed task weights (normalised to sum 1); signals are ignored."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"static weights must be a non-empty 1-D sequence, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"static weights must be finite, non-negative and not all zero, got {w.tolist()}")
    w = w / w.sum()

    def init(num_tasks: int) -> StaticState:
        k = check_num_tasks(num_tasks)
        if k != w.size:
            raise ValueError(f"static weights have {w.size} entries but num_tasks={k}")
        return StaticState(jnp.asarray(w, jnp.float32))

    def update(signals: TaskSignals, state: StaticState):
        del signals
        return state.weights, state

    return TaskWeightOptimizer(init, update, lambda state: state.weights)


def uniform() -> TaskWeightOptimizer:
    """z_k = 1 / K forever (plain multi-task GRPO / DAPO)."""

    def init(num_tasks: int) -> StaticState:
        k = check_num_tasks(num_tasks)
        return StaticState(jnp.full((k,), 1.0 / k, jnp.float32))

    def update(signals: TaskSignals, state: StaticState):
        del signals
        return state.weights, state

    return TaskWeightOptimizer(init, update, lambda state: state.weights)
