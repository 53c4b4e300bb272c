"""SEC, static and uniform weightings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtgrpo_jax.weighting import TaskSignals, sec, static, uniform


def test_sec_matches_numpy():
    alpha, temperature = 0.5, 0.2
    rng = np.random.default_rng(0)
    steps, k = 20, 3
    abs_adv = rng.uniform(0, 1, size=(steps, k))
    present = rng.uniform(size=(steps, k)) < 0.7
    abs_adv[3, 0] = np.nan  # present but broken: masked and counted
    present[3, 0] = True
    opt = sec(alpha, temperature)
    state = opt.init(k)
    q = np.zeros(k)
    update = jax.jit(opt.update)
    for t in range(steps):
        z, state = update(TaskSignals(abs_advantage=jnp.asarray(abs_adv[t]), present=jnp.asarray(present[t])), state)
        ok = present[t] & np.isfinite(abs_adv[t])
        q = np.where(ok, (1 - alpha) * q + alpha * np.nan_to_num(abs_adv[t]), q)
        e = np.exp(q / temperature)
        np.testing.assert_allclose(state.q, q, rtol=1e-6)
        np.testing.assert_allclose(z, e / e.sum(), rtol=1e-5)
    assert state.rejected.tolist() == [1, 0, 0]
    # the task with the most left to learn (largest |A|) gets the most weight
    opt = sec()
    z, _ = opt.update(TaskSignals(abs_advantage=jnp.asarray([0.1, 0.9, 0.4])), opt.init(3))
    assert int(jnp.argmax(z)) == 1


def test_static_and_uniform():
    opt = static([1.0, 3.0, 0.0])
    state = jax.jit(opt.init, static_argnums=0)(3)
    z, state2 = jax.jit(opt.update)(TaskSignals(reward=jnp.asarray([jnp.nan, 0.0, 1.0])), state)
    np.testing.assert_allclose(z, [0.25, 0.75, 0.0])
    np.testing.assert_allclose(opt.weights(state2), z)
    u = uniform()
    z, _ = u.update(TaskSignals(), u.init(4))
    np.testing.assert_allclose(z, 0.25)
    with pytest.raises(ValueError, match="num_tasks=2"):
        opt.init(2)
    for bad in ([], [1.0, -1.0], [0.0, 0.0], [1.0, np.nan]):
        with pytest.raises(ValueError, match="static weights"):
            static(bad)
    with pytest.raises(ValueError, match="temperature=0"):
        sec(temperature=0.0)
    with pytest.raises(ValueError, match="alpha=2"):
        sec(alpha=2.0)
    with pytest.raises(ValueError, match="needs TaskSignals.abs_advantage"):
        sec().update(TaskSignals(reward=jnp.zeros(3)), sec().init(3))
