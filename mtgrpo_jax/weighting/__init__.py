"""Task-weight optimizers (optax-style `init` / `update` / `weights`, NamedTuple states, jittable and
vmappable over runs). Pure array math: no model, data or trainer imports.

    from mtgrpo_jax.weighting import TaskSignals, mt_grpo, regularized, sec, static, uniform
    opt = mt_grpo(lam=0.2)
    state = opt.init(num_tasks)
    z, state = opt.update(TaskSignals(reward=J, improvement=I, present=present), state)
"""

from mtgrpo_jax.weighting.base import TaskSignals, TaskWeightOptimizer
from mtgrpo_jax.weighting.baselines import SECState, StaticState, sec, static, uniform
from mtgrpo_jax.weighting.mt_grpo import (
    MTGRPOState,
    RegularizedState,
    mt_grpo,
    mt_grpo_released,
    regularized,
    regularized_released,
)

__all__ = [
    "MTGRPOState",
    "RegularizedState",
    "SECState",
    "StaticState",
    "TaskSignals",
    "TaskWeightOptimizer",
    "mt_grpo",
    "mt_grpo_released",
    "regularized",
    "regularized_released",
    "sec",
    "static",
    "uniform",
]
