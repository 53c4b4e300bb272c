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
    np.testing.assert_allclose(
        fn(jnp.asarray(logits), jnp.asarray(tokens), 0.8, chunk_size=chunk_size), exp_lp, rtol=1e-5, atol=1e-5
    )


def test_bf16_logits_give_float32_and_chunked_gradient_matches():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(0, 2, size=(2, 6, 50)), jnp.bfloat16)
    tokens = jnp.asarray(rng.integers(0, 50, size=(2, 6)))
    fn = jax.jit(token_logprobs_from_logits, static_argnames="chunk_size")
    plain, chunked = fn(logits, tokens), fn(logits, tokens, chunk_size=16)
    assert plain.dtype == chunked.dtype == jnp.float32
    np.testing.assert_allclose(plain, chunked, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        plain, ref_logprobs(np.asarray(logits, np.float32), np.asarray(tokens), 1.0)[0], rtol=1e-5, atol=1e-5
    )

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


def _full_from_hidden(hidden, head, tokens, temperature):
    logits = jnp.einsum("nth,hv->ntv", hidden, head, preferred_element_type=jnp.float32) / temperature
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(logp_all, tokens[..., None], axis=-1)[..., 0]
    return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)


@pytest.mark.parametrize("seq_chunk,vocab_chunk", [(3, 0), (0, 10), (3, 10), (16, 64)])
def test_chunked_from_hidden_matches_full_values_and_gradients(seq_chunk, vocab_chunk):
    """Chunk sizes that do not divide T = 7 or V = 37 (and ones larger than the axis) give the full values
    and the full gradients with respect to both the hidden states and the head."""
    from mtgrpo_jax.rl import token_logprobs_from_hidden

    rng = np.random.default_rng(2)
    hidden = jnp.asarray(rng.normal(0, 1, size=(2, 7, 12)), jnp.float32)
    head = jnp.asarray(rng.normal(0, 0.5, size=(12, 37)), jnp.float32)
    head = head.at[:, 5].mul(4.0)  # some peaked rows
    tokens = jnp.asarray(rng.integers(0, 37, size=(2, 7)))
    weights = jnp.asarray(rng.normal(size=(2, 7)), jnp.float32)

    def objective(fn):
        def f(h, w):
            lp, ent = fn(h, w)
            return jnp.sum(lp * weights) + 0.3 * jnp.sum(ent * weights[::-1])

        return f

    full = lambda h, w: _full_from_hidden(h, w, tokens, 0.7)  # noqa: E731
    chunked = lambda h, w: token_logprobs_from_hidden(
        h,
        w,
        tokens,
        0.7,
        seq_chunk=seq_chunk,  # noqa: E731
        vocab_chunk=vocab_chunk,
        return_entropy=True,
    )
    exp_lp, exp_ent = jax.jit(full)(hidden, head)
    lp, ent = jax.jit(chunked)(hidden, head)
    assert lp.shape == ent.shape == tokens.shape and lp.dtype == jnp.float32
    np.testing.assert_allclose(lp, exp_lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent, exp_ent, rtol=1e-5, atol=1e-5)
    ref_lp, ref_ent = ref_logprobs(
        np.asarray(hidden, np.float64) @ np.asarray(head, np.float64), np.asarray(tokens), 0.7
    )
    np.testing.assert_allclose(lp, ref_lp, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ent, ref_ent, rtol=1e-4, atol=1e-4)
    g_full = jax.jit(jax.grad(objective(full), argnums=(0, 1)))(hidden, head)
    g_chunk = jax.jit(jax.grad(objective(chunked), argnums=(0, 1)))(hidden, head)
    for a, b in zip(g_chunk, g_full):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_chunked_from_hidden_never_holds_full_logits():
    """With sequence and vocabulary chunks, no buffer of the compiled forward+backward is as large as the
    float32 [N, T, V] logits (the full path's is)."""
    from mtgrpo_jax.rl import token_logprobs_from_hidden

    n, t, h, v = 2, 256, 16, 4096
    hidden = jax.ShapeDtypeStruct((n, t, h), jnp.float32)
    head = jax.ShapeDtypeStruct((h, v), jnp.float32)
    tokens = jnp.zeros((n, t), jnp.int32)

    def temp_bytes(fn):
        loss = lambda hd, w: jnp.sum(fn(hd, w))  # noqa: E731
        return (
            jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, head).compile().memory_analysis().temp_size_in_bytes
        )

    full = temp_bytes(lambda hd, w: _full_from_hidden(hd, w, tokens, 1.0)[0])
    chunked = temp_bytes(lambda hd, w: token_logprobs_from_hidden(hd, w, tokens, seq_chunk=16, vocab_chunk=1024))
    logits_bytes = n * t * v * 4
    assert full >= logits_bytes
    assert chunked < logits_bytes / 4


def test_from_hidden_errors():
    from mtgrpo_jax.rl import token_logprobs_from_hidden

    with pytest.raises(ValueError, match="expected hidden"):
        token_logprobs_from_hidden(jnp.zeros((2, 3, 4)), jnp.zeros((5, 7)), jnp.zeros((2, 3), int))
    with pytest.raises(ValueError, match="seq_chunk=-1"):
        token_logprobs_from_hidden(jnp.zeros((2, 3, 4)), jnp.zeros((4, 7)), jnp.zeros((2, 3), int), seq_chunk=-1)
