"""`loops.scan`: an ordinary scan, fully unrolled under `unrolled_scans()` so XLA's cost analysis counts
every trip; the switch is part of the jit cache key."""

import jax
import jax.numpy as jnp
import numpy as np

from mtgrpo_jax import loops


def _net(x, w):
    def step(h, wi):
        return jnp.tanh(h @ wi), jnp.sum(h)

    h, sums = loops.scan(step, x, w)
    return jnp.sum(h) + jnp.sum(sums)


def test_unrolled_scan_gives_the_same_values_and_gradients():
    x = jax.random.normal(jax.random.key(0), (8, 16))
    w = jax.random.normal(jax.random.key(1), (5, 16, 16)) / 4
    value, grad = jax.value_and_grad(_net, argnums=(0, 1))(x, w)
    with loops.unrolled_scans():
        assert loops.unrolling()
        value_u, grad_u = jax.value_and_grad(_net, argnums=(0, 1))(x, w)
    assert not loops.unrolling()
    np.testing.assert_allclose(value_u, value, rtol=1e-6)
    for a, b in zip(grad_u, grad):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_cost_analysis_counts_every_trip_only_when_unrolled_and_the_jit_cache_tells_them_apart():
    trips, rows, width = 6, 32, 64
    x, w = jnp.ones((rows, width)), jnp.ones((trips, width, width))
    fn = jax.jit(_net)  # one jitted function, lowered in both modes: the cache must not hand back the other

    def flops():
        return fn.lower(x, w).compile().cost_analysis()["flops"]

    matmuls = trips * 2 * rows * width * width
    scanned = flops()
    with loops.unrolled_scans():
        unrolled = flops()
        assert "while" not in fn.lower(x, w).as_text()
    assert "while" in fn.lower(x, w).as_text()
    assert scanned < 0.5 * matmuls  # the body once
    assert matmuls <= unrolled <= 1.1 * matmuls  # every trip (plus tanh and sums)
    assert flops() == scanned
