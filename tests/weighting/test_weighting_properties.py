"""Property checks over random signals for every optimizer, vmapped over independent runs: weights on
the simplex, states finite, non-finite signals counted and never absorbed."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtgrpo_jax.weighting import TaskSignals, mt_grpo, mt_grpo_released, regularized, sec, static, uniform

K, RUNS, STEPS = 5, 16, 200

OPTIMIZERS = {
    "mt_grpo": lambda: mt_grpo(0.5),
    "mt_grpo_big_lr": lambda: mt_grpo(3.0, learning_rate=1.0),
    "mt_grpo_released": lambda: mt_grpo_released(0.2),
    "regularized": lambda: regularized(0.1, lam=2.0, learning_rate=5.0),
    "regularized_tiny_eta": lambda: regularized(1e-5, lam=5.0, learning_rate=100.0),
    "sec": lambda: sec(),
    "sec_cold": lambda: sec(alpha=1.0, temperature=0.01),
    "static": lambda: static([1, 2, 3, 4, 0]),
    "uniform": lambda: uniform(),
}


@jax.jit
def random_signals(key):
    """[RUNS, STEPS, K] signals: rewards in [0, 1], improvements heavy-tailed, 30% absent, 5% non-finite."""
    ks = jax.random.split(key, 6)
    shape = (RUNS, STEPS, K)
    reward = jax.random.uniform(ks[0], shape)
    improvement = 0.1 * jax.random.t(ks[1], 2.0, shape)
    abs_adv = jnp.abs(jax.random.normal(ks[2], shape))
    present = jax.random.uniform(ks[3], shape) < 0.7
    bad = jax.random.uniform(ks[4], shape) < 0.05
    poison = jax.random.choice(ks[5], jnp.array([jnp.nan, jnp.inf, -jnp.inf]), shape)
    which = jax.random.randint(ks[5], shape, 0, 3)
    reward = jnp.where(bad & (which == 0), poison, reward)
    improvement = jnp.where(bad & (which == 1), poison, improvement)
    abs_adv = jnp.where(bad & (which == 2), poison, abs_adv)
    return TaskSignals(reward, improvement, abs_adv, present), bad, which


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_simplex_finiteness_and_rejection_under_vmap(name):
    opt = OPTIMIZERS[name]()
    signals, bad, which = random_signals(jax.random.key(zlib.crc32(name.encode())))

    def one_run(sig):
        def body(state, s):
            z, state = opt.update(s, state)
            return state, z

        return jax.lax.scan(body, opt.init(K), sig)

    states, zs = jax.jit(jax.vmap(one_run))(signals)
    zs = np.asarray(zs)
    assert zs.shape == (RUNS, STEPS, K)
    assert np.all(np.isfinite(zs)) and np.all(zs >= 0)
    np.testing.assert_allclose(zs.sum(-1), 1.0, atol=1e-5)
    assert jax.tree.all(jax.tree.map(lambda x: bool(jnp.all(jnp.isfinite(x))), states))
    if hasattr(states, "rejected"):
        reads = {"sec": [2], "sec_cold": [2], "regularized": [0], "regularized_tiny_eta": [0]}.get(
            name, [0, 1]
        )  # fields read
        expected = np.sum(np.asarray(bad & signals.present & jnp.isin(which, jnp.asarray(reads))), axis=1)
        np.testing.assert_array_equal(np.asarray(states.rejected), expected)
        assert expected.sum() > 0
    if name.startswith(("mt_grpo", "regularized", "sec")):
        assert np.abs(zs[:, -1] - 1 / K).max() > 1e-3  # not trivially uniform: the weights did move


def test_runs_are_independent_under_vmap():
    """vmap over runs gives exactly what each run gives alone."""
    opt = mt_grpo(0.5)
    signals, _, _ = random_signals(jax.random.key(7))

    def one_run(sig):
        return jax.lax.scan(lambda st, s: opt.update(s, st)[::-1], opt.init(K), sig)[1]

    batched = np.asarray(jax.jit(jax.vmap(one_run))(signals))
    single = np.asarray(jax.jit(one_run)(jax.tree.map(lambda x: x[3], signals)))
    np.testing.assert_allclose(batched[3], single, rtol=1e-6, atol=1e-7)


def test_hyperparameters_can_vary_across_vmapped_runs():
    lams = jnp.asarray([0.0, 0.5, 5.0])
    reward = jnp.asarray([0.2, 0.5, 0.8])

    def run(lam):
        opt = mt_grpo(lam)
        body = lambda st, _: opt.update(TaskSignals(reward, jnp.zeros(3)), st)[::-1]  # noqa: E731
        return jax.lax.scan(body, opt.init(3), None, length=50)[1][-1]

    z = np.asarray(jax.jit(jax.vmap(run))(lams))
    np.testing.assert_allclose(z[0], 1 / 3, atol=1e-6)  # lam = 0, I = 0: no signal, weights stay uniform
    assert z[1, 0] > 0.4 and z[2, 0] > 0.4
