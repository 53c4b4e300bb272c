"""Group advantages and zero-gradient filters against a float64 NumPy reference."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtgrpo_jax.rl import group_advantages, zero_gradient_mask


def ref_advantages(r, estimator, std, eps):
    r = np.asarray(r, np.float64)
    out = np.empty_like(r)
    for p, row in enumerate(r):
        g = len(row)
        for i, x in enumerate(row):
            others = np.delete(row, i)
            if estimator == "rloo":
                out[p, i] = x - others.mean()
            elif estimator == "drgrpo":
                out[p, i] = x - row.mean()
            else:
                sd = np.sqrt(((row - row.mean()) ** 2).sum() / (g - 1 if std == "unbiased" else g))
                out[p, i] = (x - row.mean()) / (sd + eps)
    return out


def _rewards(seed, p=6, g=5):
    rng = np.random.default_rng(seed)
    r = rng.choice([0.0, 0.1, 1.0], size=(p, g))
    r[0] = 1.0  # an all-correct group: advantage exactly 0 everywhere
    r[1] = rng.normal(size=g)
    return r


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize(
    "estimator,std", [("grpo", "unbiased"), ("grpo", "biased"), ("drgrpo", "unbiased"), ("rloo", "unbiased")]
)
def test_advantages_match_numpy(estimator, std, precision):
    rewards = _rewards(0)
    expected = ref_advantages(rewards, estimator, std, 1e-6)
    ctx = jax.enable_x64(True) if precision == "float64" else contextlib.nullcontext()
    with ctx:
        fn = jax.jit(group_advantages, static_argnames=("estimator", "std"))
        got = fn(jnp.asarray(rewards, precision), estimator=estimator, std=std)
        assert got.dtype == jnp.dtype(precision)
        rtol = 1e-6 if precision == "float64" else 1e-5
        np.testing.assert_allclose(np.asarray(got), expected, rtol=rtol, atol=rtol * np.abs(expected).max())
    assert np.all(np.asarray(got)[0] == 0.0)


def test_equal_rewards_give_exactly_zero():
    rewards = jnp.full((3, 7), 0.1, jnp.float32).at[1].set(1 / 3)
    for est in ("grpo", "drgrpo", "rloo"):
        assert np.all(np.asarray(group_advantages(rewards, est)) == 0.0)


def test_advantage_properties():
    rewards = jnp.asarray(_rewards(1, p=8, g=6), jnp.float32)
    for est in ("grpo", "drgrpo", "rloo"):
        a = group_advantages(rewards, est)
        np.testing.assert_allclose(np.asarray(a).sum(1), 0.0, atol=1e-5)  # zero-mean within groups
    a = np.asarray(group_advantages(rewards, "grpo", "unbiased"))
    nonconst = np.asarray(rewards).std(1) > 0
    np.testing.assert_allclose(a[nonconst].std(1, ddof=1), 1.0, rtol=1e-4)
    # integer and boolean rewards are promoted to float32
    assert group_advantages(jnp.array([[1, 0, 1]]), "rloo").dtype == jnp.float32
    assert group_advantages(jnp.array([[True, False]])).dtype == jnp.float32


def test_advantage_errors():
    with pytest.raises(ValueError, match="estimator='ppo'"):
        group_advantages(jnp.zeros((2, 3)), "ppo")
    with pytest.raises(ValueError, match="std='sample'"):
        group_advantages(jnp.zeros((2, 3)), std="sample")
    with pytest.raises(ValueError, match=r"\[P, G\]"):
        group_advantages(jnp.zeros(5))
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(jnp.zeros((4, 1)))


def test_zero_gradient_mask_strict_and_lenient():
    rng = np.random.default_rng(3)
    rewards = rng.choice([0.0, 0.1, 1.0], size=(64, 4), p=[0.4, 0.3, 0.3])
    rewards[:3] = [[1, 1, 1, 1], [0, 0, 0, 0], [0.1, 0.1, 0.1, 0.1]]
    rewards[3] = [0.1, 0.0, 0.1, 0.0]  # unequal rewards, but nothing correct
    correct = rewards >= 1.0
    strict = np.asarray(jax.jit(zero_gradient_mask, static_argnames="mode")(jnp.asarray(correct), mode="strict"))
    lenient = np.asarray(jax.jit(zero_gradient_mask, static_argnames="mode")(jnp.asarray(rewards), mode="lenient"))
    np.testing.assert_array_equal(strict, correct.any(1) & ~correct.all(1))
    np.testing.assert_array_equal(lenient, rewards.max(1) != rewards.min(1))
    assert list(strict[:4]) == [False, False, False, False]
    assert list(lenient[:4]) == [False, False, False, True]
    # lenient keeps exactly the groups with a nonzero advantage
    adv = np.asarray(group_advantages(jnp.asarray(rewards, jnp.float32), "drgrpo"))
    np.testing.assert_array_equal(lenient, np.abs(adv).max(1) > 0)
    # strict drops a subset of what lenient drops
    assert np.all(lenient[strict])


def test_zero_gradient_mask_edge_cases():
    with pytest.raises(ValueError, match="boolean `correct`"):
        zero_gradient_mask(jnp.zeros((2, 3)), mode="strict")
    with pytest.raises(ValueError, match="mode='loose'"):
        zero_gradient_mask(jnp.zeros((2, 3), bool), mode="loose")
    rewards = jnp.array([[0.0, 1.0], [jnp.nan, 1.0], [jnp.inf, 1.0]])
    assert zero_gradient_mask(rewards, "lenient").tolist() == [True, False, False]
    assert zero_gradient_mask(jnp.array([[True, False], [True, True]]), "lenient").tolist() == [True, False]
