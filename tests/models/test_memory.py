"""Memory features of the model path: chunked log-probs through the real model, remat policies,
attention implementations (each against the plain XLA path)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtgrpo_jax.models import ModelConfig, Transformer
from mtgrpo_jax.train.update import completion_logprobs

CFG = ModelConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False)


def _batch(rows=3, prompt=5, completion=7, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, CFG.vocab_size, size=(rows, prompt + completion)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    mask[0, :3] = False  # left padding
    mask[1, prompt + 4:] = False  # a short completion
    ids[~mask] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


@pytest.mark.parametrize("tied", [False, True])
def test_completion_logprobs_chunked_equal_full_values_and_gradients(tied):
    """The update's logprob forward with chunk sizes that divide neither T = 7 nor V = 101 equals the full
    computation, values and parameter gradients (< 1e-5, float32)."""
    cfg = ModelConfig(**{**CFG.__dict__, "tie_word_embeddings": tied})
    model = Transformer(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    graphdef, params = nnx.split(model)
    ids, mask = _batch()
    w = jnp.linspace(-1.0, 1.0, 3 * 7).reshape(3, 7)

    def loss(params, **chunks):
        m = nnx.merge(graphdef, params)
        lp, ent = completion_logprobs(m, ids, mask, 7, 0.9, **chunks)
        return jnp.sum(lp * w) + 0.1 * jnp.sum(ent), (lp, ent)

    full_grad = jax.jit(jax.grad(loss, has_aux=True))
    chunk_grad = jax.jit(jax.grad(lambda p: loss(p, seq_chunk=3, vocab_chunk=17), has_aux=True))
    g_full, (lp_full, ent_full) = full_grad(params)
    g_chunk, (lp_chunk, ent_chunk) = chunk_grad(params)
    np.testing.assert_allclose(lp_chunk, lp_full, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent_chunk, ent_full, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_chunk), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
