"""The jitted device-side programs of a training step: token logprobs, the policy update (mini-batches x
micro-batches inside one `lax.scan`, via `loops.scan` so `mtgrpo plan` can unroll it; parameters and
optimizer state donated, non-finite updates skipped), the per-task objective used for the improvement
signal, and the supervised warm-start update.

Everything here takes the model as (graphdef, params) so one compiled program serves every step; the
host never sees an intermediate value of the update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mtgrpo_jax import loops
from mtgrpo_jax.rl import per_task_objective, policy_loss, token_logprobs_from_hidden


class Batch(NamedTuple):
    """A fixed-shape training batch: N rows = B groups x G rollouts (padded rows have row_valid False).

    Sequences are the left-padded prompt (P tokens, the prompt bucket) followed by the right-padded
    completion (T = max_new_tokens). `completion_mask` marks the completion tokens that count.
    """

    input_ids: jax.Array  # [N, P+T] int32
    attention_mask: jax.Array  # [N, P+T] bool
    completion_mask: jax.Array  # [N, T] bool
    old_logp: jax.Array  # [N, T] float32
    advantages: jax.Array  # [N] float32
    task_ids: jax.Array  # [N] int32
    ref_logp: jax.Array  # [N, T] float32 (zeros when beta == 0)


def completion_logprobs(
    model,
    input_ids,
    attention_mask,
    completion_len: int,
    temperature: float,
    *,
    seq_chunk: int = 0,
    vocab_chunk: int = 0,
):
    """float32 log pi(token) / temperature-scaled, and the entropy, at each completion position: [N, T].

    `seq_chunk` / `vocab_chunk` (config `loss.logprob_chunk` / `loss.vocab_chunk`; 0 = whole) compute the LM
    head and the softmax in rematerialised chunks, so float32 `[N, T, V]` logits are never held."""
    positions = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)
    hidden = model.trunk(input_ids, positions=positions, attention_mask=attention_mask)
    total = input_ids.shape[1]
    start = total - completion_len
    # Position p predicts token p + 1: the completion tokens are predicted by positions start-1 .. total-2.
    h = hidden[:, start - 1 : total - 1]
    if seq_chunk or vocab_chunk:
        return token_logprobs_from_hidden(
            h,
            model.head_matrix(),
            input_ids[:, start:],
            temperature,
            seq_chunk=seq_chunk,
            vocab_chunk=vocab_chunk,
            return_entropy=True,
        )
    logits = model.logits(h).astype(jnp.float32) / temperature
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    targets = input_ids[:, start:]
    logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy


class UpdateSettings(NamedTuple):
    """The static knobs of the update program (hashable, so they key the jit cache)."""

    mini_batches: int
    micro_batches: int
    completion_len: int
    temperature: float
    eps_low: float
    eps_high: float
    dual_clip: float | None
    aggregation: str
    beta: float
    kl_estimator: str
    entropy_coef: float
    num_tasks: int
    # Which improvement estimator the update computes (see `IMPROVEMENT_ESTIMATORS`): "none", "step_mean"
    # (the trainer's own forward after the update), "minibatch_sum" (the release's; one extra forward per
    # mini-batch) or "fresh" (free: read off the update's own forwards).
    improvement: str
    logprob_chunk: int = 0  # loss.logprob_chunk: positions per chunk of the LM head + softmax (0: whole)
    vocab_chunk: int = 0  # loss.vocab_chunk: vocabulary slice per chunk (0: whole)
    # Also compute the other in-update estimators ("minibatch_sum" and "fresh" rows), returned in the
    # metrics as improvement/<name> [M, K], to measure how the estimators agree on one trajectory.
    improvement_diagnostics: bool = False

    @property
    def improvement_forward(self) -> bool:
        """Whether the step runs the `step_mean` estimator's own forward after the update."""
        return self.improvement == "step_mean" or self.improvement_diagnostics


def _split(batch: Batch, parts: int) -> Batch:
    return jax.tree.map(lambda x: x.reshape((parts, x.shape[0] // parts) + x.shape[1:]), batch)


def _loss_kwargs(s: UpdateSettings) -> dict:
    return dict(eps_low=s.eps_low, eps_high=s.eps_high, aggregation=s.aggregation, dual_clip=s.dual_clip)


def _objective(s: UpdateSettings, logp, b: Batch):
    """Per-task GRPO objective [K] of `logp` on rows b (the surrogate, as the loss aggregates it)."""
    out = per_task_objective(
        logp, b.old_logp, b.advantages, b.completion_mask, b.task_ids, s.num_tasks, **_loss_kwargs(s)
    )
    return out[0] if isinstance(out, tuple) else out


def sequence_sums(s: UpdateSettings, logp, b: Batch):
    """Per task [K]: the sum over its rows of each row's token-mean clipped surrogate (an objective).

    This is the release's scale of the improvement signal (``verl/verl/workers/actor/dp_actor.py``:
    ``pg_loss_vec`` is each sequence's masked token-mean loss, core_algos.py:375; lines 376 / 465 collect
    it per task before and after the mini-batch's optimizer step; line 485 takes the difference of the
    per-task *sums*, all-reduced over workers at 481-483). Entropy and KL terms, which the release adds
    with coefficients 0 in every script, are left out."""
    kw = dict(_loss_kwargs(s), aggregation="seq-mean-token-mean")
    out = per_task_objective(logp, b.old_logp, b.advantages, b.completion_mask, b.task_ids, s.num_tasks, **kw)
    return out.objective * out.count


IMPROVEMENT_ESTIMATORS = ("none", "step_mean", "minibatch_sum", "fresh")
"""How I_k, the change of task k's objective caused by a training step's policy update, is measured.

  step_mean      the project's original estimator: J_k (the loss's aggregation, a per-task token-mean for
                 token-mean) after the whole update minus J_k of the behaviour policy, on the whole batch;
                 one extra forward of the batch per step. ~1/N_k of the release's scale.
  minibatch_sum  the release's: per mini-batch m, the per-task sum over m's sequences of each sequence's
                 surrogate after m's optimizer step minus before it (`sequence_sums`); one extra forward of
                 every mini-batch. Rows [M, K]; the paper's optimizer sums them, the released one steps
                 once per row.
  fresh          free: mini-batch m's own training forward already runs under parameters moved by
                 mini-batches 0..m-1, which never saw m's rows, so the per-task sum of the surrogate
                 there minus at the behaviour policy (ratio 1) is the earlier updates' improvement on
                 held-out rows of the same step, at the release's scale. Mini-batch 0 reads 0 (up to
                 the behaviour/training forward gap). Rows [M, K], no extra forward.
"""


def make_update_fn(graphdef, tx: optax.GradientTransformation, s: UpdateSettings, constrain: Callable = lambda b: b):
    """Returns update(params, opt_state, batch) -> (params, opt_state, metrics, improvement [M, K] or None).

    `constrain` puts sharding constraints on each micro-batch (batch rows over the data axes).
    """

    def loss_fn(params, mb: Batch):
        model = nnx.merge(graphdef, params)
        logp, entropy = completion_logprobs(
            model, mb.input_ids, mb.attention_mask, s.completion_len, s.temperature, **_chunks(s)
        )
        loss, metrics = policy_loss(
            logp,
            mb.old_logp,
            mb.advantages,
            mb.completion_mask,
            ref_logp=mb.ref_logp if s.beta > 0 else None,
            beta=s.beta,
            kl_estimator=s.kl_estimator,
            entropy=entropy,
            entropy_coef=s.entropy_coef,
            **_loss_kwargs(s),
        )
        return loss, (metrics, logp)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def minibatch_step(carry, mb: Batch):
        params, opt_state = carry
        micro = _split(mb, s.micro_batches)

        def micro_step(acc, m):
            m = constrain(m)
            (loss, (metrics, logp)), grads = grad_fn(params, m)
            acc = jax.tree.map(jnp.add, acc, grads)
            return acc, (loss, metrics, logp)

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, (losses, metrics, logp) = loops.scan(micro_step, zeros, micro)
        grads = jax.tree.map(lambda g: g / s.micro_batches, grads)
        loss = jnp.mean(losses)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # A non-finite loss or gradient leaves parameters and optimizer state exactly as they were.
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        params, opt_state = keep(new_params, params), keep(new_opt_state, opt_state)
        out = {k: jnp.mean(v) for k, v in metrics.items()}
        out.update(loss=loss, grad_norm=grad_norm, skipped=(~finite).astype(jnp.float32))
        wanted = {s.improvement} | ({"minibatch_sum", "fresh"} if s.improvement_diagnostics else set())
        if wanted & {"minibatch_sum", "fresh"}:
            flat = lambda x: x.reshape((-1,) + x.shape[2:])
            before = sequence_sums(s, flat(logp), mb)  # this mini-batch's training forward, before its step
            if "minibatch_sum" in wanted:
                # The updated policy's forward of this mini-batch, one micro-batch at a time (as the training
                # forward ran it), so it holds no more than one micro-batch's activations.
                model = nnx.merge(graphdef, params)

                def after_step(_, m):
                    m = constrain(m)
                    after, _ = completion_logprobs(
                        model, m.input_ids, m.attention_mask, s.completion_len, s.temperature, **_chunks(s)
                    )
                    return None, after

                _, after_logp = loops.scan(after_step, None, micro)
                out["improvement/minibatch_sum"] = sequence_sums(s, flat(after_logp), mb) - before
            if "fresh" in wanted:
                out["improvement/fresh"] = before - sequence_sums(s, mb.old_logp, mb)
        return (params, opt_state), out

    def update(params, opt_state, batch: Batch):
        (params, opt_state), metrics = loops.scan(minibatch_step, (params, opt_state), _split(batch, s.mini_batches))
        rows = {k: metrics.pop(k) for k in list(metrics) if k.startswith("improvement/")}  # [M, K] each
        improvement = rows.pop(f"improvement/{s.improvement}", None)
        metrics = {k: jnp.mean(v) for k, v in metrics.items()} | {"skipped": jnp.sum(metrics["skipped"])} | rows
        return params, opt_state, metrics, improvement

    return jax.jit(update, donate_argnums=(0, 1))


def _chunks(s: UpdateSettings) -> dict:
    return dict(seq_chunk=s.logprob_chunk, vocab_chunk=s.vocab_chunk)


def make_logprob_fn(
    graphdef, completion_len: int, temperature: float, chunks: int = 1, *, seq_chunk: int = 0, vocab_chunk: int = 0
):
    """logprobs(params, input_ids, attention_mask) -> [N, T] float32, computed in `chunks` row-chunks (and,
    within a row-chunk, in `seq_chunk` x `vocab_chunk` pieces of the LM head, see `completion_logprobs`)."""

    def fn(params, input_ids, attention_mask):
        model = nnx.merge(graphdef, params)

        def one(_, xs):
            ids, mask = xs
            logp, _ = completion_logprobs(
                model, ids, mask, completion_len, temperature, seq_chunk=seq_chunk, vocab_chunk=vocab_chunk
            )
            return None, logp

        n = input_ids.shape[0]
        _, logp = jax.lax.scan(
            one, None, (input_ids.reshape(chunks, n // chunks, -1), attention_mask.reshape(chunks, n // chunks, -1))
        )
        return logp.reshape(n, -1)

    return jax.jit(fn)


def make_objective_fn(graphdef, s: UpdateSettings, chunks: int = 1):
    """objective(params, batch) -> per-task GRPO objective [K] of the policy `params` on the batch."""
    logprobs = make_logprob_fn(graphdef, s.completion_len, s.temperature, chunks, **_chunks(s))

    def fn(params, batch: Batch):
        return _objective(s, logprobs(params, batch.input_ids, batch.attention_mask), batch)

    return jax.jit(fn)


def objective_at_behaviour(s: UpdateSettings, batch: Batch):
    """The per-task objective of the policy that generated the batch (logp = old_logp: every ratio is 1)."""
    return _objective(s, batch.old_logp, batch)


def make_sft_update_fn(
    graphdef, tx: optax.GradientTransformation, completion_len: int, *, seq_chunk: int = 0, vocab_chunk: int = 0
):
    """Supervised warm start: token-mean cross-entropy of the demonstration tokens."""

    def loss_fn(params, input_ids, attention_mask, target_mask):
        model = nnx.merge(graphdef, params)
        logp, _ = completion_logprobs(
            model, input_ids, attention_mask, completion_len, 1.0, seq_chunk=seq_chunk, vocab_chunk=vocab_chunk
        )
        m = target_mask.astype(jnp.float32)
        return -jnp.sum(logp * m) / jnp.maximum(jnp.sum(m), 1.0)

    def update(params, opt_state, input_ids, attention_mask, target_mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, input_ids, attention_mask, target_mask)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(update, donate_argnums=(0, 1))


def init_opt_state(tx: optax.GradientTransformation, params, mesh):
    """The optimizer state created directly in its parameters' shardings (FSDP-sharded moments, never a
    full copy on one device) with scalars (step counts) replicated, so a restored state lands exactly
    where a fresh one does."""
    replicated = NamedSharding(mesh, P())
    shardings = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        jax.eval_shape(tx.init, params),
        jax.tree.map(lambda x: x.sharding, params),
        transform_non_params=lambda _: replicated,
    )
    return jax.jit(tx.init, out_shardings=shardings)(params)


def make_optimizer(
    learning_rate: float, *, b1: float, b2: float, weight_decay: float, grad_clip: float | None, warmup_steps: int = 0
) -> optax.GradientTransformation:
    schedule: Any = learning_rate
    if warmup_steps:
        schedule = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
    return optax.chain(*parts)
