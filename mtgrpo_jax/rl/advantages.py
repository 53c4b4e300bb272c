"""Group-relative advantages and the zero-gradient filters.

Rewards arrive as ``[P, G]``: P prompts, G sampled completions each. Every estimator here is a
baseline subtracted within a group, so a group whose rewards are all equal has advantage exactly 0
and contributes no policy gradient; `zero_gradient_mask` finds those groups so the sampler can
replace them (the paper's ratio-preserving resampling) instead of wasting batch slots on them.
"""

from __future__ import annotations

import jax.numpy as jnp

ADVANTAGE_ESTIMATORS = ("grpo", "drgrpo", "rloo")
STD_ESTIMATORS = ("unbiased", "biased")
ZERO_GRADIENT_MODES = ("strict", "lenient")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


def _float(x: jnp.ndarray) -> jnp.ndarray:
    """Loss math runs in at least float32 (float64 stays float64 under x64)."""
    return (
        x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if jnp.issubdtype(x.dtype, jnp.floating)
        else x.astype(jnp.float32)
    )


def group_advantages(rewards, estimator: str = "grpo", std: str = "unbiased", eps: float = 1e-6):
    """Per-completion advantages ``[P, G]`` from rewards ``[P, G]``.

    - ``"grpo"``:   (r - mean_g r) / (std_g r + eps). ``std="unbiased"`` divides by G - 1 (torch.std,
      as verl does); ``"biased"`` by G (the DeepSeekMath formula read literally).
    - ``"drgrpo"``: r - mean_g r (Dr. GRPO drops the std, which over-weights nearly-solved groups).
    - ``"rloo"``:   r - mean of the *other* G - 1 rewards = G / (G - 1) * (r - mean_g r).

    ``std`` and ``eps`` only matter for ``"grpo"``. Integer or boolean rewards are promoted to
    float32. G must be at least 2: a single completion has no group to compare against.
    """
    check_choice("estimator", estimator, ADVANTAGE_ESTIMATORS)
    check_choice("std", std, STD_ESTIMATORS)
    rewards = jnp.asarray(rewards)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [P, G] (prompts x completions), got shape {rewards.shape}")
    group = rewards.shape[1]
    if group < 2:
        raise ValueError(f"rewards has group size G={group}; group-relative advantages need G >= 2")
    r = _float(rewards)
    # A group of equal rewards gets exactly 0, not a rounding residue of the mean blown up by 1 / eps.
    constant = jnp.max(r, axis=1, keepdims=True) == jnp.min(r, axis=1, keepdims=True)
    centred = jnp.where(constant, 0.0, r - jnp.mean(r, axis=1, keepdims=True))
    if estimator == "drgrpo":
        return centred
    if estimator == "rloo":
        return centred * (group / (group - 1))
    ddof = 1 if std == "unbiased" else 0
    sd = jnp.sqrt(jnp.sum(centred * centred, axis=1, keepdims=True) / (group - ddof))
    return centred / (sd + eps)


def zero_gradient_mask(rewards_or_correct, mode: str = "strict"):
    """``[P]`` bool keep-mask: False for groups that would give zero policy gradient.

    - ``"strict"`` (the paper's Experiment 1) takes the boolean ``correct`` array ``[P, G]`` and drops
      groups where no completion or every completion is correct. With partial-credit rewards
      (1.0 / 0.1 / 0) such a group can still have unequal rewards, yet it carries no signal about
      correctness, so it is dropped too.
    - ``"lenient"`` (Experiment 2) takes rewards ``[P, G]`` (any dtype) and drops groups whose rewards
      are all exactly equal, i.e. exactly the groups whose advantages are all 0. Groups holding a
      non-finite reward are dropped as well: their advantages would be NaN and poison the update.
    """
    check_choice("mode", mode, ZERO_GRADIENT_MODES)
    x = jnp.asarray(rewards_or_correct)
    if x.ndim != 2:
        raise ValueError(f"rewards_or_correct must be [P, G], got shape {x.shape}")
    if mode == "strict":
        if x.dtype != jnp.bool_:
            raise ValueError(
                f"zero_gradient_mask(mode='strict') takes the boolean `correct` array, got dtype {x.dtype}; "
                "pass e.g. rewards >= 1.0"
            )
        return jnp.any(x, axis=1) & ~jnp.all(x, axis=1)
    if x.dtype == jnp.bool_:
        return jnp.any(x, axis=1) & ~jnp.all(x, axis=1)
    finite = jnp.all(jnp.isfinite(x), axis=1) if jnp.issubdtype(x.dtype, jnp.floating) else True
    return (jnp.max(x, axis=1) != jnp.min(x, axis=1)) & finite
