"""RL loss kernels: group advantages, zero-gradient filters, clipped policy losses, KL estimators,
per-task objectives and token logprobs. Pure array functions, jittable, no model or data imports.

    from mtgrpo_jax.rl import group_advantages, policy_loss, per_task_objective, zero_gradient_mask
"""

from mtgrpo_jax.rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    STD_ESTIMATORS,
    ZERO_GRADIENT_MODES,
    group_advantages,
    zero_gradient_mask,
)
from mtgrpo_jax.rl.logprobs import token_logprobs_from_hidden, token_logprobs_from_logits
from mtgrpo_jax.rl.losses import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    TaskObjectives,
    kl_penalty,
    per_task_objective,
    policy_loss,
    recombine_task_objectives,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "STD_ESTIMATORS",
    "ZERO_GRADIENT_MODES",
    "TaskObjectives",
    "group_advantages",
    "kl_penalty",
    "per_task_objective",
    "policy_loss",
    "recombine_task_objectives",
    "token_logprobs_from_hidden",
    "token_logprobs_from_logits",
    "zero_gradient_mask",
]
