"""MT-GRPO's task-weight updates: the paper's Subroutine 1 (`mt_grpo`), its released-code variant
(`mt_grpo_released`) and the regularised worst-task update of Subroutine 2 (`regularized`).

The weights are a softmax over logits xi (one per task). Each step scores task k by

    s_k = I_k + lam * J_k          (improvement I_k, reward J_k)

and moves weight towards tasks with a *low* score: the ones that are both weak and not improving.
The score's z-weighted mean is minimised: d/dxi_k sum_j z_j s_j = z_k (s_k - sum_j z_j s_j) = g_k.
With I = 0 this is a softmax-parametrised min over tasks, so the weights collapse onto the
lowest-reward task (the paper's Figure 2); the improvement term counters the collapse, because a task
that receives weight improves, its score rises and weight flows back to the others.

Paper (Subroutine 1, the default) vs. the released code (`mt_grpo_released`), side by side (release
paths under ``verl/verl/`` of github.com/rsshyam/MT-GRPO):

=====================  ==========================================  ===============================================
                       paper: ``mt_grpo(lam)``                     released: ``mt_grpo_released(lam)``
=====================  ==========================================  ===============================================
improvement I_k        as given; ``[M, K]`` per-mini-batch rows    one row per policy mini-batch, each clipped to
                       are summed; optional ``improvement_clip``   [-clip, clip] (0.1; Exp 2 uses 0.2 for some lam:
                       on the sum (the paper's appendix: 0.1/0.2)  `delta_threshold`, ``priority_decay.py``
                                                                   ``calculate_delta``)
weight steps           one Adam(W) step per training step          one Adam step per mini-batch row (4 per step;
                                                                   ``priority_decay.py`` ``update``, the
                                                                   ``task_diff_bias`` loop)
reward term J_k        as given (the task's batch reward)          EMA (decay 0.5) *starting at 0*, moved once per
                                                                   generation round incl. resamples
                                                                   (``update_batch_acc``, called from
                                                                   ``trainer/ppo/ray_trainer.py`` every round) of
                                                                   the round's binary accuracy before filtering
absent tasks           frozen (neutral score, lazy Adam)           stepped like the others with I_k = 0 and
                                                                   lam * (their EMA) (``values_by_arm`` defaults
                                                                   to 0; ``rewards_by_arm`` reads every arm)
weight decay           decoupled (optax.adamw): xi -= lr wd xi     coupled L2, g += wd * xi, before Adam
                                                                   (``torch.optim.Adam(weight_decay=gamma)``)
optimizer              Adam b1=0.9, b2=0.999, eps=1e-8, lr=0.025,  same (torch defaults)
                       wd=1e-5, xi_0 = 0 (uniform weights)
=====================  ==========================================  ===============================================

The scale of I_k is the trainer's (see `mtgrpo_jax.train.update`): by default the release's, the sum over
a mini-batch's sequences of each sequence's change of its token-mean surrogate, so the published lam
values (0.1-1.2) weigh the two terms as in the paper's runs.

Absent tasks in the paper's form (``present[k]`` False, or non-finite signals): their score is imputed
as the present tasks' z-weighted mean, which makes their gradient exactly 0, and their logit and Adam
moments are frozen for the step (lazy Adam: no momentum drift, no decay while unobserved; the shared
step count still advances). Their weight z_k can still change, because the other logits move. A step
with no task present leaves the state untouched (only ``rejected`` counts). With every task present this
is exactly the paper's update.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtgrpo_jax.weighting.base import (
    TaskSignals,
    TaskWeightOptimizer,
    accept_signals,
    check_hyper,
    check_num_tasks,
    present_weighted_mean,
    reward_ema_update,
)

ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8
RELEASED_IMPROVEMENT_CLIP = 0.1
RELEASED_REWARD_EMA = 0.5


class MTGRPOState(NamedTuple):
    logits: jax.Array  # xi [K]; z = softmax(xi)
    opt_state: Any  # the optax state of the Adam(W) step on xi
    reward_ema: jax.Array  # [K] EMA of the reward (only used with reward_ema)
    reward_seen: jax.Array  # [K] bool: the EMA has been seeded
    rejected: jax.Array  # [K] int32: updates whose signals for a present task were non-finite
    step: jax.Array  # int32: updates that saw at least one task


def _initial_state(tx, num_tasks: int) -> MTGRPOState:
    """Zero logits (uniform weights), the logit optimizer's state, and zeroed reward/presence bookkeeping."""
    k = check_num_tasks(num_tasks)
    logits = jnp.zeros((k,), jnp.float32)
    return MTGRPOState(
        logits,
        tx.init(logits),
        jnp.zeros((k,), jnp.float32),
        jnp.zeros((k,), jnp.bool_),
        jnp.zeros((k,), jnp.int32),
        jnp.zeros((), jnp.int32),
    )


def _freeze_absent(new, old, ok):
    """Keep old values of absent tasks' [K] leaves; scalar leaves move iff any task was present."""
    any_ok = jnp.any(ok)

    def pick(n, o):
        if jnp.shape(n) == ok.shape:
            return jnp.where(ok, n, o)
        return jnp.where(any_ok, n, o)

    return jax.tree.map(pick, new, old)


def mt_grpo(
    lam: float,
    learning_rate: float = 0.025,
    weight_decay: float = 1e-5,
    *,
    improvement_clip: float | None = None,
    reward_ema: float | None = None,
    coupled_weight_decay: bool = False,
) -> TaskWeightOptimizer:
    """MT-GRPO's improvement-aware weight update (the paper's Subroutine 1; see the module docstring).

    s_k = I_k + lam * J_k;  g_k = z_k (s_k - sum_j z_j s_j);  xi <- AdamW(xi, g);  z = softmax(xi).
    Needs ``TaskSignals.reward`` and ``TaskSignals.improvement``. The options reproduce the released
    code one by one; `mt_grpo_released` sets all three.
    """
    check_hyper("lam", lam, low=0.0)
    check_hyper("learning_rate", learning_rate, low=0.0, low_open=True)
    check_hyper("weight_decay", weight_decay, low=0.0)
    if improvement_clip is not None:
        check_hyper("improvement_clip", improvement_clip, low=0.0, low_open=True)
    if reward_ema is not None:
        check_hyper("reward_ema", reward_ema, low=0.0, high=1.0)
    if coupled_weight_decay:
        tx = optax.chain(
            optax.add_decayed_weights(weight_decay),
            optax.scale_by_adam(b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS),
            optax.scale_by_learning_rate(learning_rate),
        )
    else:
        tx = optax.adamw(learning_rate, b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS, weight_decay=weight_decay)

    def init(num_tasks: int) -> MTGRPOState:
        return _initial_state(tx, num_tasks)

    def update(signals: TaskSignals, state: MTGRPOState):
        k = state.logits.shape[0]
        signals = signals._replace(improvement=_step_improvement(signals.improvement))
        ok, rejected, sig = accept_signals(signals, ("reward", "improvement"), k, "mt_grpo")
        improvement = sig["improvement"]
        if improvement_clip is not None:
            improvement = jnp.clip(improvement, -improvement_clip, improvement_clip)
        reward, ema, seen = reward_ema_update(sig["reward"], ok, state.reward_ema, state.reward_seen, reward_ema)
        score = improvement + lam * reward
        z = jax.nn.softmax(state.logits)
        grad = jnp.where(ok, z * (score - present_weighted_mean(score, z, ok)), 0.0)
        updates, opt_state = tx.update(grad, state.opt_state, state.logits)
        logits = optax.apply_updates(state.logits, updates)
        logits, opt_state = _freeze_absent((logits, opt_state), (state.logits, state.opt_state), ok)
        new = MTGRPOState(
            logits,
            opt_state,
            ema,
            seen,
            state.rejected + rejected.astype(jnp.int32),
            state.step + jnp.any(ok).astype(jnp.int32),
        )
        return jax.nn.softmax(logits), new

    def weights(state: MTGRPOState):
        return jax.nn.softmax(state.logits)

    return TaskWeightOptimizer(init, update, weights)


def _step_improvement(improvement):
    """[M, K] per-mini-batch improvements summed to the step's [K]; [K] (or None) passed through."""
    if improvement is None:
        return None
    improvement = jnp.asarray(improvement)
    return jnp.sum(improvement, axis=0) if improvement.ndim == 2 else improvement


def _released_rounds(signals: TaskSignals, k: int):
    """The per-round rewards [R, K] (NaN: task not generated in that round) the released EMA moves on."""
    if signals.round_reward is not None:
        rounds = jnp.asarray(signals.round_reward, jnp.float32)
        if rounds.ndim != 2 or rounds.shape[1] != k:
            raise ValueError(f"TaskSignals.round_reward must be [R, {k}], got shape {rounds.shape}")
        return rounds
    if signals.reward is None:
        raise ValueError("mt_grpo_released needs TaskSignals.reward or TaskSignals.round_reward, got None")
    reward = jnp.asarray(signals.reward, jnp.float32)
    if reward.shape != (k,):
        raise ValueError(f"TaskSignals.reward must be [{k}], got shape {reward.shape}")
    present = jnp.ones((k,), bool) if signals.present is None else jnp.asarray(signals.present, bool)
    return jnp.where(present, jnp.where(jnp.isnan(reward), jnp.inf, reward), jnp.nan)[None, :]


def mt_grpo_released(
    lam: float,
    learning_rate: float = 0.025,
    weight_decay: float = 1e-5,
    *,
    improvement_clip: float | None = RELEASED_IMPROVEMENT_CLIP,
    reward_ema: float = RELEASED_REWARD_EMA,
    use_improvement: bool = True,
    steps_per_update: int = 1,
) -> TaskWeightOptimizer:
    """Subroutine 1 as the released code runs it (``utils/auto_curriculum/priority_decay.py``,
    ``FamoPriorityDecay.update`` with ``update_object='task_diff_bias'``, ``bias_metric='batch_acc'``):

        J <- a J + (1 - a) acc_r  for every generation round r, from J = 0 (``update_batch_acc``)
        for each policy mini-batch m:  delta = clip(I_m, +-clip) + lam J      (``calculate_delta``, ``combine``)
                                       g = z (delta - z.delta);  xi <- Adam(xi, g + wd xi)   (``opt.step()``)

    ``TaskSignals.improvement`` is ``[M, K]`` (one weight step per row) or ``[K]`` (one step); tasks
    without rows in a mini-batch have I = 0 there and keep their lam J term. ``TaskSignals.round_reward``
    ``[R, K]`` feeds the EMA (falls back to ``reward`` as one round). Improvements of tasks not
    ``present`` read as 0. With ``use_improvement=False`` the
    improvement is ignored and ``steps_per_update`` identical reward-only steps are made: the released
    Subroutine 2 (`regularized_released`). Non-finite improvements or rewards of a present task count
    in ``rejected``; the improvement then reads as 0 and the reward moves no EMA.
    """
    check_hyper("lam", lam, low=0.0)
    check_hyper("learning_rate", learning_rate, low=0.0, low_open=True)
    check_hyper("weight_decay", weight_decay, low=0.0)
    check_hyper("reward_ema", reward_ema, low=0.0, high=1.0)
    if improvement_clip is not None:
        check_hyper("improvement_clip", improvement_clip, low=0.0, low_open=True)
    if isinstance(steps_per_update, bool) or not isinstance(steps_per_update, int) or steps_per_update < 1:
        raise ValueError(f"steps_per_update={steps_per_update!r} must be a positive int")
    tx = optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_adam(b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS),
        optax.scale_by_learning_rate(learning_rate),
    )

    def init(num_tasks: int) -> MTGRPOState:
        return _initial_state(tx, num_tasks)

    def update(signals: TaskSignals, state: MTGRPOState):
        if not isinstance(signals, TaskSignals):
            raise ValueError(f"mt_grpo_released.update takes a TaskSignals, got {type(signals).__name__}")
        k = state.logits.shape[0]
        present = jnp.ones((k,), bool) if signals.present is None else jnp.asarray(signals.present, bool)
        if present.shape != (k,):
            raise ValueError(f"TaskSignals.present must be [{k}], got shape {present.shape}")
        rounds = _released_rounds(signals, k)
        rejected = present & jnp.any(jnp.isinf(rounds), axis=0)  # NaN marks a task's absence from a round
        if use_improvement:
            if signals.improvement is None:
                raise ValueError("mt_grpo_released needs TaskSignals.improvement, got None")
            rows = jnp.asarray(signals.improvement, jnp.float32)
            rows = rows[None, :] if rows.ndim == 1 else rows
            if rows.ndim != 2 or rows.shape[1] != k:
                raise ValueError(f"TaskSignals.improvement must be [{k}] or [M, {k}], got shape {rows.shape}")
            rejected = rejected | (present & ~jnp.all(jnp.isfinite(rows), axis=0))
            rows = jnp.where(present & ~rejected, rows, 0.0)
            if improvement_clip is not None:
                rows = jnp.clip(rows, -improvement_clip, improvement_clip)
        else:
            rows = jnp.zeros((steps_per_update, k), jnp.float32)
        # A rejected task is treated as absent: no EMA move, I = 0 (its lam * J term still counts).
        ema = state.reward_ema
        for acc in rounds:
            seen = jnp.isfinite(acc) & ~rejected
            ema = jnp.where(seen, reward_ema * ema + (1.0 - reward_ema) * jnp.where(seen, acc, 0.0), ema)
        logits, opt_state = state.logits, state.opt_state
        for row in rows:
            delta = row + lam * ema
            z = jax.nn.softmax(logits)
            grad = z * (delta - jnp.sum(z * delta))
            updates, opt_state = tx.update(grad, opt_state, logits)
            logits = optax.apply_updates(logits, updates)
        new = MTGRPOState(
            logits,
            opt_state,
            ema,
            state.reward_seen | present,
            state.rejected + rejected.astype(jnp.int32),
            state.step + 1,
        )
        return jax.nn.softmax(logits), new

    def weights(state: MTGRPOState):
        return jax.nn.softmax(state.logits)

    return TaskWeightOptimizer(init, update, weights)


def regularized_released(
    eta: float, lam: float = 0.2, learning_rate: float = 0.025, steps_per_update: int = 4
) -> TaskWeightOptimizer:
    """Subroutine 2 as the released scripts run it (``scripts/exp-*/appendix/run_mt-grpo_reg_*.sh``:
    ``lambda_bias_type='bias_only'``, ``lambda_bias=0.2``, ``gamma`` = eta in {1e-5, 5e-4, 1e-2}): the
    reward-only score lam * J (J the released accuracy EMA), ``steps_per_update`` (the number of policy
    mini-batches, 4) torch-Adam steps per training step with eta as coupled L2 weight decay."""
    check_hyper("eta", eta, low=0.0, low_open=True)
    return mt_grpo_released(
        lam,
        learning_rate,
        weight_decay=eta,
        improvement_clip=None,
        use_improvement=False,
        steps_per_update=steps_per_update,
    )


class RegularizedState(NamedTuple):
    logits: jax.Array  # xi [K]; z = softmax(xi)
    rejected: jax.Array  # [K] int32: non-finite signals seen for present tasks
    step: jax.Array


def regularized(eta: float, learning_rate: float = 0.025, *, lam: float = 1.0) -> TaskWeightOptimizer:
    """The paper's Subroutine 2 (App. F): the reward-only worst-task update with an L2 pull of the logits.

        s_k = lam * J_k;   g_k = z_k (s_k - sum_j z_j s_j);   xi <- xi - lr * (g + eta * xi);   z = softmax(xi)

    starting from xi = 0. Without improvement signals, the descent on z.J alone collapses onto the
    lowest-reward task (eta -> 0, the paper's Figure 2); eta > 0 keeps the logits bounded, so z stays
    inside the simplex: the fixed point satisfies xi_k = -z_k (s_k - z.s) / eta. The paper uses lam = 1;
    the released code scores lam * J with lam = 0.2 and applies eta as the coupled weight decay of four
    Adam steps on xi per training step (`regularized_released`; plain descent needs hundreds of steps
    to move as far as Adam does in ten, so the paper's collapse shows only with that one). Absent (or non-finite) tasks get the present tasks'
    z-weighted mean score, so no gradient, while the eta pull still applies to every logit.
    """
    check_hyper("eta", eta, low=0.0, low_open=True)
    check_hyper("lam", lam, low=0.0)
    check_hyper("learning_rate", learning_rate, low=0.0, low_open=True)

    def init(num_tasks: int) -> RegularizedState:
        k = check_num_tasks(num_tasks)
        return RegularizedState(jnp.zeros((k,), jnp.float32), jnp.zeros((k,), jnp.int32), jnp.zeros((), jnp.int32))

    def update(signals: TaskSignals, state: RegularizedState):
        k = state.logits.shape[0]
        ok, rejected, sig = accept_signals(signals, ("reward",), k, "regularized")
        z = jax.nn.softmax(state.logits)
        score = lam * sig["reward"]
        score = jnp.where(ok, score, present_weighted_mean(score, z, ok))
        grad = z * (score - jnp.sum(z * score))
        logits = state.logits - learning_rate * (grad + eta * state.logits)
        any_ok = jnp.any(ok)
        logits = jnp.where(any_ok, logits, state.logits)
        new = RegularizedState(
            logits, state.rejected + rejected.astype(jnp.int32), state.step + any_ok.astype(jnp.int32)
        )
        return jax.nn.softmax(logits), new

    def weights(state: RegularizedState):
        return jax.nn.softmax(state.logits)

    return TaskWeightOptimizer(init, update, weights)
