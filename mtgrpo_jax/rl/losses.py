"""Clipped token-level policy losses (GRPO / DAPO / Dr. GRPO), KL estimators and per-task objectives.

Everything works on ``[N, T]`` token arrays (N sequences, T response positions) with ``[N]`` sequence
advantages and a ``[N, T]`` mask of real response tokens (bool or 0/1). Math runs in float32 (float64
under x64) whatever the input dtype.

Padding is inert by construction: the log-ratio, the KL argument and the per-token loss are all
``where``-masked, so a padded position contributes exactly 0 to the loss, receives exactly 0 gradient,
and may hold any value (even inf or NaN) without changing anything.

How the per-token loss L[i, t] becomes a scalar (``aggregation``):

====================================  =========================================================
``"token-mean"`` (DAPO)               sum_{i,t} m L / sum_{i,t} m
``"seq-mean-token-mean"`` (GRPO)      mean over sequences i with >= 1 token of (sum_t m L / sum_t m)
``"seq-mean-token-sum-norm"`` (Dr.)   mean over sequences i with >= 1 token of (sum_t m L / max_length)
====================================  =========================================================

``max_length`` defaults to T; pass the rollout's maximum response length so the divisor stays
constant across batches (the point of Dr. GRPO). Rows with no tokens (padding rows) do not count as
sequences in either ``seq-mean`` mode.

Every mode is ``sum_i value_i / sum_i count_i`` with a per-row numerator ``value_i`` and a per-row
count ``count_i`` (tokens for token-mean, 1 per non-empty row otherwise). `per_task_objective` takes the
same ratio within each task's rows, so the per-task objectives recombine exactly:
``-policy_loss = sum_k count_k J_k / sum_k count_k`` (`recombine_task_objectives`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtgrpo_jax.rl.advantages import check_choice

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


def _is_concrete_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def kl_penalty(logp, ref_logp, estimator: str = "k3"):
    """Per-token estimate of KL(pi_theta || pi_ref) on tokens sampled from pi_theta (Schulman's k1/k2/k3).

    With d = logp - ref_logp and u = pi_ref / pi_theta = exp(-d):
    k1 = d (unbiased, high variance, can be negative); k2 = d^2 / 2 (biased, low variance);
    k3 = u - log u - 1 = exp(-d) + d - 1 (unbiased, >= 0; the paper's f_KL, verl's ``low_var_kl``
    without its clamp). Gradients w.r.t. logp: 1, d and 1 - u.
    """
    check_choice("kl_estimator", estimator, KL_ESTIMATORS)
    d = logp - ref_logp
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    return jnp.expm1(-d) + d


class _TokenTerms(NamedTuple):
    loss: jax.Array  # [N, T] total per-token loss (pg + beta * kl - entropy_coef * entropy), 0 off-mask
    pg: jax.Array  # [N, T] clipped surrogate loss
    kl: jax.Array | None
    entropy: jax.Array | None
    ratio: jax.Array
    mask: jax.Array  # [N, T] bool
    adv: jax.Array  # [N] advantages, 0 on empty rows


def _token_terms(
    logp,
    old_logp,
    advantages,
    mask,
    *,
    eps_low,
    eps_high,
    ref_logp,
    beta,
    kl_estimator,
    dual_clip,
    entropy,
    entropy_coef,
) -> _TokenTerms:
    logp = jnp.asarray(logp)
    if logp.ndim != 2:
        raise ValueError(f"logp must be [N, T], got shape {logp.shape}")
    shape = logp.shape
    named = {"old_logp": old_logp, "mask": mask, "ref_logp": ref_logp, "entropy": entropy}
    for name, arr in named.items():
        if arr is not None and jnp.shape(arr) != shape:
            raise ValueError(f"{name} must have the shape of logp {shape}, got {jnp.shape(arr)}")
    if jnp.shape(advantages) != shape[:1]:
        raise ValueError(f"advantages must be [N] = {shape[:1]}, got shape {jnp.shape(advantages)}")
    check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    if _is_concrete_number(eps_low) and not 0.0 <= eps_low < 1.0:
        raise ValueError(f"eps_low={eps_low} must lie in [0, 1)")
    if _is_concrete_number(eps_high) and eps_high < 0.0:
        raise ValueError(f"eps_high={eps_high} must be >= 0")
    if dual_clip is not None and _is_concrete_number(dual_clip) and dual_clip <= 1.0:
        raise ValueError(f"dual_clip={dual_clip} must be > 1 (it bounds the loss of negative-advantage tokens)")
    if ref_logp is None and not (_is_concrete_number(beta) and beta == 0):
        raise ValueError(f"beta={beta} needs ref_logp (the reference policy's token logprobs)")
    if entropy is None and not (_is_concrete_number(entropy_coef) and entropy_coef == 0):
        raise ValueError(f"entropy_coef={entropy_coef} needs the per-token entropy array")

    dtype = jnp.promote_types(logp.dtype, jnp.float32)
    m = jnp.asarray(mask) != 0
    row_has_tokens = jnp.any(m, axis=1)
    adv = jnp.where(row_has_tokens, jnp.asarray(advantages).astype(dtype), 0.0)[:, None]

    def masked(x):
        # Masking every input before any arithmetic keeps padded garbage (inf, NaN) out of exp() and out
        # of the backward pass: the gradient of `where` is exactly 0 on the unselected side.
        return jnp.where(m, jnp.asarray(x).astype(dtype), 0.0)

    logp = masked(logp)
    ratio = jnp.exp(logp - masked(old_logp))
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    pg = jnp.maximum(pg_unclipped, pg_clipped)
    if dual_clip is not None:
        # Dual clip (Ye et al. 2020): for A < 0 the loss is capped at -A * c, so a token whose ratio has
        # already exploded cannot dominate the update.
        pg = jnp.where(adv < 0, jnp.minimum(pg, -adv * dual_clip), pg)
    loss = pg

    kl = None
    if ref_logp is not None:
        kl = kl_penalty(logp, masked(ref_logp), kl_estimator)
        loss = loss + beta * kl
    ent = None
    if entropy is not None:
        ent = masked(entropy)
        loss = loss - entropy_coef * ent
    return _TokenTerms(jnp.where(m, loss, 0.0), pg, kl, ent, ratio, m, adv[:, 0])


def _row_terms(per_token, mask, aggregation: str, max_length):
    """(value_i, count_i) per row so that the aggregate is sum(value) / sum(count)."""
    check_choice("aggregation", aggregation, AGGREGATIONS)
    dtype = per_token.dtype
    row_sum = jnp.sum(jnp.where(mask, per_token, 0.0), axis=1)
    row_tokens = jnp.sum(mask, axis=1).astype(dtype)
    if aggregation == "token-mean":
        return row_sum, row_tokens
    nonempty = (row_tokens > 0).astype(dtype)
    if aggregation == "seq-mean-token-mean":
        return row_sum / jnp.maximum(row_tokens, 1.0), nonempty
    length = per_token.shape[1] if max_length is None else max_length
    if _is_concrete_number(length) and length <= 0:
        raise ValueError(f"max_length={length} must be positive")
    return row_sum / length, nonempty


def _aggregate(per_token, mask, aggregation: str, max_length):
    value, count = _row_terms(per_token, mask, aggregation, max_length)
    return jnp.sum(value) / jnp.maximum(jnp.sum(count), 1.0)


def _masked_mean(x, mask):
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1).astype(x.dtype)


def policy_loss(
    logp,
    old_logp,
    advantages,
    mask,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: str = "seq-mean-token-mean",
    max_length: int | None = None,
    ref_logp=None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    dual_clip: float | None = None,
    entropy=None,
    entropy_coef: float = 0.0,
):
    """Clipped surrogate loss to *minimise*, and its metrics.

    Per token: r = exp(logp - old_logp); L = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)),
    capped at -A * dual_clip where A < 0 if ``dual_clip`` is set; plus ``beta * kl_penalty(logp,
    ref_logp, kl_estimator)`` and minus ``entropy_coef * entropy``. DAPO's clip-higher is
    eps_low=0.2, eps_high=0.28. With beta=0 (the default) ``ref_logp`` may be omitted entirely, so no
    reference forward pass is needed. See the module docstring for ``aggregation`` / ``max_length``.

    Returns ``(loss, metrics)``; metrics are stop-gradient float scalars:
    ``pg_loss``, ``kl`` (if ref_logp), ``entropy`` (if given) aggregated like the loss, so that
    loss = pg_loss + beta * kl - entropy_coef * entropy; token means over real tokens:
    ``clip_frac_low`` (A < 0 and r < 1 - eps_low), ``clip_frac_high`` (A > 0 and r > 1 + eps_high),
    ``dual_clip_frac`` (if dual_clip; A < 0 and r > dual_clip), ``approx_kl`` (k3 estimate of
    KL(pi_old || pi_theta) = mean(r - 1 - log r)), ``ratio_mean``/``ratio_min``/``ratio_max``
    (0 when there are no tokens) and ``num_tokens``.
    """
    terms = _token_terms(
        logp,
        old_logp,
        advantages,
        mask,
        eps_low=eps_low,
        eps_high=eps_high,
        ref_logp=ref_logp,
        beta=beta,
        kl_estimator=kl_estimator,
        dual_clip=dual_clip,
        entropy=entropy,
        entropy_coef=entropy_coef,
    )
    loss = _aggregate(terms.loss, terms.mask, aggregation, max_length)
    return loss, _metrics(
        terms, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, aggregation=aggregation, max_length=max_length
    )


def _metrics(t: _TokenTerms, *, eps_low, eps_high, dual_clip, aggregation, max_length) -> dict:
    t = jax.tree.map(jax.lax.stop_gradient, t)
    m, r, adv = t.mask, t.ratio, t.adv[:, None]
    agg = lambda x: _aggregate(x, m, aggregation, max_length)  # noqa: E731
    has_tokens = jnp.any(m)
    out = {
        "pg_loss": agg(t.pg),
        "clip_frac_low": _masked_mean(((adv < 0) & (r < 1.0 - eps_low)).astype(r.dtype), m),
        "clip_frac_high": _masked_mean(((adv > 0) & (r > 1.0 + eps_high)).astype(r.dtype), m),
        "approx_kl": _masked_mean(r - 1.0 - jnp.log(r), m),
        "ratio_mean": _masked_mean(r, m),
        "ratio_min": jnp.where(has_tokens, jnp.min(jnp.where(m, r, jnp.inf)), 0.0),
        "ratio_max": jnp.where(has_tokens, jnp.max(jnp.where(m, r, -jnp.inf)), 0.0),
        "num_tokens": jnp.sum(m).astype(r.dtype),
    }
    if dual_clip is not None:
        out["dual_clip_frac"] = _masked_mean(((adv < 0) & (r > dual_clip)).astype(r.dtype), m)
    if t.kl is not None:
        out["kl"] = agg(t.kl)
    if t.entropy is not None:
        out["entropy"] = agg(t.entropy)
    return out


class TaskObjectives(NamedTuple):
    """Per-task objectives ``objective[k]`` (0 for a task with no rows) and recombination weights
    ``count[k]`` (real tokens for token-mean, non-empty sequences for the seq-mean modes)."""

    objective: jax.Array
    count: jax.Array


def per_task_objective(
    logp,
    old_logp,
    advantages,
    mask,
    task_ids,
    num_tasks: int,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: str = "seq-mean-token-mean",
    max_length: int | None = None,
    ref_logp=None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    dual_clip: float | None = None,
    entropy=None,
    entropy_coef: float = 0.0,
) -> TaskObjectives:
    """Each task's GRPO objective J_k on this batch (an objective: higher is better), ``[num_tasks]``.

    J_k is minus the `policy_loss` of the same arguments restricted to the rows with
    ``task_ids == k`` (same per-token terms, same aggregation, same ``max_length``), computed with
    segment sums in one pass. With beta = entropy_coef = 0 it is the clipped surrogate alone. Rows
    whose id lies outside [0, num_tasks) (e.g. -1 for padding rows) are ignored here; give them an
    all-False mask so the full loss ignores them too. Then, exactly,

        -policy_loss(...) == sum_k count_k * J_k / sum_k count_k      (`recombine_task_objectives`).

    J_k of the updated policy minus J_k of the policy that collected the batch, on the same batch, is
    how the trainer measures the per-task improvement I_k fed to the weight optimizer.
    """
    task_ids = jnp.asarray(task_ids)
    if task_ids.shape != jnp.shape(advantages):
        raise ValueError(f"task_ids must be [N] = {jnp.shape(advantages)}, got shape {task_ids.shape}")
    if not jnp.issubdtype(task_ids.dtype, jnp.integer):
        raise ValueError(f"task_ids must be integers, got dtype {task_ids.dtype}")
    if not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks={num_tasks!r} must be a positive Python int (it fixes the output shape)")
    terms = _token_terms(
        logp,
        old_logp,
        advantages,
        mask,
        eps_low=eps_low,
        eps_high=eps_high,
        ref_logp=ref_logp,
        beta=beta,
        kl_estimator=kl_estimator,
        dual_clip=dual_clip,
        entropy=entropy,
        entropy_coef=entropy_coef,
    )
    value, count = _row_terms(terms.loss, terms.mask, aggregation, max_length)
    total = jax.ops.segment_sum(value, task_ids, num_segments=num_tasks)
    counts = jax.ops.segment_sum(count, task_ids, num_segments=num_tasks)
    objective = jnp.where(counts > 0, -total / jnp.maximum(counts, 1.0), 0.0)
    return TaskObjectives(objective, counts)


def recombine_task_objectives(objective, count):
    """The full-batch objective from per-task ones: sum_k count_k J_k / sum_k count_k (0 if empty)."""
    return jnp.sum(objective * count) / jnp.maximum(jnp.sum(count), 1.0)
