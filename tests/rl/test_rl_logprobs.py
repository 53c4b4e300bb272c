"""Token logprobs / entropies: float64 NumPy reference, the vocab-chunked path, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtgrpo_jax.rl import token_logprobs_from_logits


def ref_logprobs(logits, tokens, temperature):
    x = np.asarray(logits, np.float64) / temperature
    x = x - x.max(-1, keepdims=True)
    logz = np.log(np.exp(x).sum(-1, keepdims=True))
    logp_all = x - logz
    p = np.exp(logp_all)
    return np.take_along_axis(logp_all, tokens[..., None], -1)[..., 0], -(p * logp_all).sum(-1)


@pytest.mark.parametrize("chunk_size", [None, 7, 16, 64])
def test_logprobs_and_entropy_match_numpy(chunk_size):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(3, 5, 37)).astype(np.float32)
    logits[0, 0, 4] = 40.0  # a very peaked row
    tokens = rng.integers(0, 37, size=(3, 5))
    fn = jax.jit(token_logprobs_from_logits, static_argnames=("chunk_size", "return_entropy"))
    lp, ent = fn(jnp.asarray(logits), jnp.asarray(tokens), 0.8, chunk_size=chunk_size, return_entropy=True)
    exp_lp, exp_ent = ref_logprobs(logits, tokens, 0.8)
    assert lp.dtype == ent.dtype == jnp.float32 and lp.shape == tokens.shape
    np.testing.assert_allclose(lp, exp_lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent, exp_ent, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fn(jnp.asarray(logits), jnp.asarray(tokens), 0.8, chunk_size=chunk_size), exp_lp,
                               rtol=1e-5, atol=1e-5)


def test_bf16_logits_give_float32_and_chunked_gradient_matches():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(0, 2, size=(2, 6, 50)), jnp.bfloat16)
    tokens = jnp.asarray(rng.integers(0, 50, size=(2, 6)))
    fn = jax.jit(token_logprobs_from_logits, static_argnames="chunk_size")
    plain, chunked = fn(logits, tokens), fn(logits, tokens, chunk_size=16)
    assert plain.dtype == chunked.dtype == jnp.float32
    np.testing.assert_allclose(plain, chunked, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(plain, ref_logprobs(np.asarray(logits, np.float32), np.asarray(tokens), 1.0)[0],
                               rtol=1e-5, atol=1e-5)

    def loss(x, chunk):
        lp, ent = token_logprobs_from_logits(x, tokens, 1.3, chunk_size=chunk, return_entropy=True)
        return jnp.sum(lp * jnp.arange(6.0)) + 0.3 * jnp.sum(ent)

    x32 = logits.astype(jnp.float32)
    g_plain = jax.jit(jax.grad(lambda x: loss(x, None)))(x32)
    g_chunk = jax.jit(jax.grad(lambda x: loss(x, 16)))(x32)
    np.testing.assert_allclose(g_chunk, g_plain, rtol=1e-5, atol=1e-6)


def test_logprob_errors():
    with pytest.raises(ValueError, match="tokens must have the shape"):
        token_logprobs_from_logits(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), int))
    with pytest.raises(ValueError, match="integer ids"):
        token_logprobs_from_logits(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="temperature=0"):
        token_logprobs_from_logits(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), int), 0.0)
    with pytest.raises(ValueError, match="chunk_size=0"):
        token_logprobs_from_logits(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), int), chunk_size=0)
