"""The improvement estimators of the jitted update against a NumPy reference of the release's
(github.com/rsshyam/MT-GRPO, verl/verl/):

  trainer/ppo/core_algos.py:375  pg_loss_vec = masked_mean(max(-A r, -A clip(r, 1-eps_low, 1+eps_high)), mask, -1)
  workers/actor/dp_actor.py:376  per task, the vector of the mini-batch's training forward (before its step)
  workers/actor/dp_actor.py:465  per task, the vector again after the mini-batch's optimizer step
  workers/actor/dp_actor.py:472-485  sums per task (all-reduced over workers), diff = new sum - old sum
  utils/auto_curriculum/priority_decay.py:1343  delta = -diff (max_rate=False): the improvement

The reference replays the update one mini-batch at a time (an M-mini-batch update is M one-mini-batch
updates in a row), takes each mini-batch's log-probs before and after its own step from the model, and
does the rest in float64 NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtgrpo_jax.models import ModelConfig, Transformer
from mtgrpo_jax.train.update import Batch, UpdateSettings, make_logprob_fn, make_optimizer, make_update_fn

K, M, ROWS, P, T = 3, 4, 16, 6, 5
CFG = dict(
    model_type="qwen2",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
    tie_word_embeddings=True,
)


def settings(improvement, mini_batches=M, diagnostics=False):
    return UpdateSettings(
        mini_batches=mini_batches,
        micro_batches=2,
        completion_len=T,
        temperature=1.0,
        eps_low=0.2,
        eps_high=0.28,
        dual_clip=None,
        aggregation="token-mean",
        beta=0.0,
        kl_estimator="k3",
        entropy_coef=0.0,
        num_tasks=K,
        improvement=improvement,
        improvement_diagnostics=diagnostics,
    )


@pytest.fixture(scope="module")
def setup():
    model = Transformer(ModelConfig(**CFG), rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    graphdef, params, _ = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 64, size=(ROWS, P + T)).astype(np.int32)
    attn = np.ones((ROWS, P + T), bool)
    attn[:4, :2] = False  # left padding of some prompts
    cmask = np.ones((ROWS, T), bool)
    cmask[::3, 3:] = False  # some short completions
    logprobs = make_logprob_fn(graphdef, T, 1.0)
    # behaviour log-probs a little off the model's own, so that ratios differ from 1 and the clip bites
    old = np.asarray(logprobs(params, ids, attn)) + rng.normal(0, 0.15, (ROWS, T)).astype(np.float32)
    adv = rng.normal(0, 1, ROWS).astype(np.float32)
    task = np.asarray([0, 1, 2, 0] * (ROWS // 4), np.int32)
    task[5] = 0  # task 1 absent from the second mini-batch
    batch = Batch(
        jnp.asarray(ids),
        jnp.asarray(attn),
        jnp.asarray(cmask),
        jnp.asarray(old),
        jnp.asarray(adv),
        jnp.asarray(task),
        jnp.zeros((ROWS, T), jnp.float32),
    )
    tx = make_optimizer(3e-2, b1=0.9, b2=0.99, weight_decay=0.0, grad_clip=None)
    return graphdef, params, batch, tx, logprobs


def release_loss_vec(logp, old, adv, mask, eps_low=0.2, eps_high=0.28):
    """core_algos.py:375, per sequence, float64."""
    ratio = np.exp(logp.astype(np.float64) - old)
    a = adv[:, None].astype(np.float64)
    loss = np.maximum(-a * ratio, -a * np.clip(ratio, 1 - eps_low, 1 + eps_high))
    return (loss * mask).sum(1) / mask.sum(1)


def per_task_sum(vec, task):
    return np.bincount(task, weights=vec, minlength=K)


def reference(setup):
    graphdef, params, batch, tx, logprobs = setup
    one = make_update_fn(graphdef, tx, settings("none", mini_batches=1))
    params = jax.tree.map(jnp.copy, params)
    opt_state = tx.init(params)
    n = ROWS // M
    b = jax.tree.map(np.asarray, batch)
    minibatch_sum, fresh = [], []
    for m in range(M):
        rows = slice(m * n, (m + 1) * n)
        mb = jax.tree.map(lambda x: jnp.asarray(x[rows]), b)
        ids, attn, mask, old, adv, task = (
            b.input_ids[rows],
            b.attention_mask[rows],
            b.completion_mask[rows],
            b.old_logp[rows],
            b.advantages[rows],
            b.task_ids[rows],
        )
        before = release_loss_vec(np.asarray(logprobs(params, ids, attn)), old, adv, mask)
        behaviour = release_loss_vec(old, old, adv, mask)
        params, opt_state, metrics, none_rows = one(params, opt_state, mb)
        # without an estimator the update computes no improvement at all
        assert none_rows is None and not any(k.startswith("improvement/") for k in metrics)
        after = release_loss_vec(np.asarray(logprobs(params, ids, attn)), old, adv, mask)
        diff = per_task_sum(after, task) - per_task_sum(before, task)  # dp_actor.py:485
        minibatch_sum.append(-diff)  # priority_decay.py:1343
        fresh.append(-(per_task_sum(before, task) - per_task_sum(behaviour, task)))
    return np.array(minibatch_sum), np.array(fresh)


def test_minibatch_sum_and_fresh_match_the_release_formula(setup):
    graphdef, params, batch, tx, _ = setup
    want_sum, want_fresh = reference(setup)
    update = make_update_fn(graphdef, tx, settings("minibatch_sum", diagnostics=True))
    _, _, metrics, rows = update(jax.tree.map(jnp.copy, params), tx.init(params), batch)
    rows = np.asarray(rows)
    assert rows.shape == (M, K)
    np.testing.assert_allclose(rows, want_sum, atol=2e-5)
    np.testing.assert_allclose(np.asarray(metrics["improvement/fresh"]), want_fresh, atol=2e-5)
    assert rows[1, 1] == 0.0  # task 1 had no rows in mini-batch 1
    assert np.abs(rows).max() > 1e-3  # the policy moved
    # the paper's optimizer gets the step's sum of the rows: the release's scale, ~N_k x a per-task mean
    np.testing.assert_allclose(rows.sum(0), want_sum.sum(0), atol=5e-5)
    # fresh alone gives the same rows as under diagnostics
    _, _, _, fresh_rows = make_update_fn(graphdef, tx, settings("fresh"))(
        jax.tree.map(jnp.copy, params), tx.init(params), batch
    )
    np.testing.assert_allclose(np.asarray(fresh_rows), want_fresh, atol=2e-5)


def test_minibatch_sum_forward_holds_one_micro_batch_at_a_time():
    """The release's estimator re-runs the mini-batch's forward after its step; run micro-batch by micro-batch
    it needs no more memory than the update without it (the whole mini-batch at once held 1.7x here, and
    took exp1's update on v6e-8 from 19 to 34 GiB per chip, over its 31 GiB)."""
    cfg = dict(CFG, vocab_size=4096)  # the [rows, T, V] logits dominate the temporaries
    model = Transformer(ModelConfig(**cfg), rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    graphdef, params, _ = nnx.split(model, nnx.Param, ...)
    rows, prompt, completion = 128, 8, 64
    sd = jax.ShapeDtypeStruct
    batch = Batch(
        sd((rows, prompt + completion), jnp.int32),
        sd((rows, prompt + completion), jnp.bool_),
        sd((rows, completion), jnp.bool_),
        sd((rows, completion), jnp.float32),
        sd((rows,), jnp.float32),
        sd((rows,), jnp.int32),
        sd((rows, completion), jnp.float32),
    )
    tx = make_optimizer(1e-3, b1=0.9, b2=0.99, weight_decay=0.0, grad_clip=1.0)
    abstract = jax.tree.map(lambda x: sd(x.shape, x.dtype), params)
    opt_state = jax.eval_shape(tx.init, abstract)

    def temp_bytes(improvement):
        s = settings(improvement, mini_batches=2)._replace(micro_batches=8, completion_len=completion)
        compiled = make_update_fn(graphdef, tx, s).lower(abstract, opt_state, batch).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes("minibatch_sum") <= 1.05 * temp_bytes("step_mean")
