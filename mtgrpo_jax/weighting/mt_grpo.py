"""MT-GRPO's task-weight updates: the paper's Subroutine 1 (`mt_grpo`), its released-code variant
(`mt_grpo_released`) and the regularised worst-task update of Subroutine 2 (`regularized`).

The weights are a softmax over logits xi (one per task). Each step scores task k by

    s_k = I_k + lam * J_k          (improvement I_k, reward J_k)

and moves weight towards tasks with a *low* score: the ones that are both weak and not improving.
The score's z-weighted mean is minimised: d/dxi_k sum_j z_j s_j = z_k (s_k - sum_j z_j s_j) = g_k.
With I = 0 this is a softmax-parametrised min over tasks, so the weights collapse onto the
lowest-reward task (the paper's Figure 2); the improvement term counters the collapse, because a task
that receives weight improves, its score rises and weight flows back to the others.

Paper (Subroutine 1, the default) vs. the released code (`mt_grpo_released`), side by side:

=====================  ===========================================  ==============================================
                       paper: ``mt_grpo(lam)``                      released: ``mt_grpo_released(lam)``
=====================  ===========================================  ==============================================
improvement I_k        as given by the trainer (one policy update)  ``improvement_clip=0.1``: clipped to
                                                                    [-0.1, 0.1]; the trainer must pass I_k
                                                                    *summed over the step's mini-batch updates*
reward term J_k        as given (the task's batch reward)           ``reward_ema=0.5``: EMA (decay 0.5, seeded by
                                                                    the first observation) of what the trainer
                                                                    passes, which must be the task's binary
                                                                    batch accuracy *before* zero-gradient
                                                                    filtering
weight decay           decoupled (optax.adamw): xi -= lr * wd * xi  ``coupled_weight_decay=True``: L2 added to
                                                                    the gradient, g += wd * xi, before Adam
                                                                    (torch.optim.Adam(weight_decay=...))
optimizer              Adam b1=0.9, b2=0.999, eps=1e-8, lr=0.025,   same
                       wd=1e-5, xi_0 = 0 (uniform weights)
=====================  ===========================================  ==============================================

Absent tasks (``present[k]`` False, or non-finite signals): their score is imputed as the present
tasks' z-weighted mean, which makes their gradient exactly 0, and their logit and Adam moments are
frozen for the step (lazy Adam: no momentum drift, no decay while unobserved; the shared step count
still advances). Their weight z_k can still change, because the other logits move. A step with no
task present leaves the state untouched (only ``rejected`` counts). With every task present this is
exactly the paper's update.
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


def _freeze_absent(new, old, ok):
    """Keep old values of absent tasks' [K] leaves; scalar leaves move iff any task was present."""
    any_ok = jnp.any(ok)

    def pick(n, o):
        if jnp.shape(n) == ok.shape:
            return jnp.where(ok, n, o)
        return jnp.where(any_ok, n, o)

    return jax.tree.map(pick, new, old)


def mt_grpo(lam: float, learning_rate: float = 0.025, weight_decay: float = 1e-5, *,
            improvement_clip: float | None = None, reward_ema: float | None = None,
            coupled_weight_decay: bool = False) -> TaskWeightOptimizer:
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
        tx = optax.chain(optax.add_decayed_weights(weight_decay),
                         optax.scale_by_adam(b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS),
                         optax.scale_by_learning_rate(learning_rate))
    else:
        tx = optax.adamw(learning_rate, b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS, weight_decay=weight_decay)

    def init(num_tasks: int) -> MTGRPOState:
        k = check_num_tasks(num_tasks)
        logits = jnp.zeros((k,), jnp.float32)
        return MTGRPOState(logits, tx.init(logits), jnp.zeros((k,), jnp.float32), jnp.zeros((k,), jnp.bool_),
                           jnp.zeros((k,), jnp.int32), jnp.zeros((), jnp.int32))

    def update(signals: TaskSignals, state: MTGRPOState):
        k = state.logits.shape[0]
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
        new = MTGRPOState(logits, opt_state, ema, seen, state.rejected + rejected.astype(jnp.int32),
                          state.step + jnp.any(ok).astype(jnp.int32))
        return jax.nn.softmax(logits), new

    def weights(state: MTGRPOState):
        return jax.nn.softmax(state.logits)

    return TaskWeightOptimizer(init, update, weights)


def mt_grpo_released(lam: float, learning_rate: float = 0.025, weight_decay: float = 1e-5) -> TaskWeightOptimizer:
    """`mt_grpo` as the released code runs it: improvement clipped to [-0.1, 0.1] (pass it summed over
    the step's mini-batch updates), reward term an EMA (decay 0.5) of the binary batch accuracy before
    filtering, and coupled (torch Adam) L2 weight decay."""
    return mt_grpo(lam, learning_rate, weight_decay, improvement_clip=RELEASED_IMPROVEMENT_CLIP,
                   reward_ema=RELEASED_REWARD_EMA, coupled_weight_decay=True)


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
    the released code scores lam * J with lam = 0.2 and applies eta as the weight decay of an Adam step
    on xi (weight decays 1e-5 / 5e-4 / 1e-2), which is `mt_grpo(lam, weight_decay=eta,
    coupled_weight_decay=True)` with zero improvement. Absent (or non-finite) tasks get the present tasks'
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
        new = RegularizedState(logits, state.rejected + rejected.astype(jnp.int32), state.step + any_ok.astype(jnp.int32))
        return jax.nn.softmax(logits), new

    def weights(state: RegularizedState):
        return jax.nn.softmax(state.logits)

    return TaskWeightOptimizer(init, update, weights)
