"""Memory features of the model path: chunked log-probs through the real model, remat policies,
attention implementations (each against the plain XLA path)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtgrpo_jax.models import ModelConfig, Transformer
from mtgrpo_jax.train.update import completion_logprobs

CFG = ModelConfig(
    vocab_size=101,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)


def _batch(rows=3, prompt=5, completion=7, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, CFG.vocab_size, size=(rows, prompt + completion)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    mask[0, :3] = False  # left padding
    mask[1, prompt + 4 :] = False  # a short completion
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


# ------------------------------------------------------------------------------------------------ attention
def _qkv(b=2, t=20, nq=4, nkv=2, d=8, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, nq, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, nkv, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, nkv, d)), jnp.float32)
    valid = np.ones((b, t), bool)
    valid[0, :5] = False  # left padding
    valid[1, :1] = False
    return q, k, v, jnp.asarray(valid)


def _cudnn_via_xla(monkeypatch):
    """The cuDNN path's own arithmetic (rotation to right padding, sequence lengths, is_causal) with
    `jax.nn.dot_product_attention`'s XLA implementation standing in for the GPU kernel on CPU."""
    from mtgrpo_jax.models import attention

    real = jax.nn.dot_product_attention
    monkeypatch.setattr(
        attention.jax.nn,
        "dot_product_attention",
        lambda *a, implementation=None, **kw: real(*a, implementation="xla", **kw),
    )


@pytest.mark.parametrize("implementation", ["splash", "cudnn"])
def test_attention_paths_equal_xla_with_left_padding_and_causality(implementation, monkeypatch):
    """Same outputs and gradients as the explicit-scores path, padded query rows included (zero); keys that
    are masked out (left padding, the future) do not move any output. splash runs the Pallas TPU kernel in
    its interpreter on CPU."""
    from mtgrpo_jax.models import causal_attention

    if implementation == "cudnn":
        _cudnn_via_xla(monkeypatch)
    q, k, v, valid = _qkv()
    ref = causal_attention(q, k, v, valid, "xla")
    out = causal_attention(q, k, v, valid, implementation)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert np.all(np.asarray(out)[~np.asarray(valid)] == 0)

    # Masked keys: the padding of row 0 and everything after position 9 cannot change outputs at <= 9.
    k2 = k.at[0, :5].set(7.0).at[:, 10:].add(3.0)
    v2 = v.at[0, :5].set(-4.0).at[:, 10:].add(1.0)
    moved = causal_attention(q, k2, v2, valid, implementation)
    np.testing.assert_allclose(moved[:, :10], out[:, :10], atol=1e-5)

    w = jnp.arange(8.0)
    loss = lambda impl: lambda q, k, v: jnp.sum(causal_attention(q, k, v, valid, impl) * w)  # noqa: E731
    g_ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    g = jax.grad(loss(implementation), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_model_with_splash_attention_under_a_mesh_equals_xla():
    """The whole model with attention="splash" (kernel under shard_map over data x tensor) gives the XLA
    path's logits on a left-padded batch."""
    from mtgrpo_jax.parallel import make_mesh

    ids, mask = _batch(rows=4)  # 4 rows over data x fsdp = 4, 2 kv heads over tensor = 2
    models = {
        impl: Transformer(CFG, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32, attention=impl)
        for impl in ("xla", "splash")
    }
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    with jax.set_mesh(mesh):
        out = {impl: np.asarray(nnx.jit(lambda m: m(ids, attention_mask=mask))(m)) for impl, m in models.items()}
    m = np.asarray(mask)
    np.testing.assert_allclose(out["splash"][m], out["xla"][m], atol=1e-5)
    assert np.abs(out["xla"][m]).max() > 0.01


def test_attention_resolution():
    from mtgrpo_jax.models import resolve_attention

    assert resolve_attention("auto", "tpu") == "splash"
    assert resolve_attention("auto", "gpu") == "cudnn"
    assert resolve_attention("auto", "cpu") == "xla"
    assert resolve_attention("auto") == "xla"  # the tests run on CPU
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        Transformer(CFG, rngs=nnx.Rngs(0), attention="flash")


# ------------------------------------------------------------------------------------------------ remat
@pytest.mark.parametrize("remat", ["block", "dots_with_no_batch_dims_saveable"])
def test_remat_policies_keep_gradients(remat):
    ids, mask = _batch()
    plain = Transformer(CFG, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    other = Transformer(CFG, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32, remat=remat)
    assert other.remat == remat

    def loss(m):
        return jnp.sum(m(ids, attention_mask=mask)[:, -3:] ** 2)

    g1 = nnx.jit(nnx.grad(loss))(plain)
    g2 = nnx.jit(nnx.grad(loss))(other)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_remat_names_are_checked_in_the_model_and_the_config():
    from mtgrpo_jax.config import ConfigError, load_config

    assert Transformer(CFG, rngs=nnx.Rngs(0), remat=True).remat == "block"
    with pytest.raises(ValueError, match="unknown remat 'save_only_these_names'"):
        Transformer(CFG, rngs=nnx.Rngs(0), remat="save_only_these_names")
    assert load_config(None, ["model.remat=checkpoint_dots"]).model.remat == "checkpoint_dots"
    with pytest.raises(ConfigError, match=r"^config error: model.remat: unknown remat 'sometimes'[^\n]*$"):
        load_config(None, ["model.remat=sometimes"])


def test_public_trunk_with_cache_is_the_cached_call_before_the_head():
    """`trunk(..., cache=...)` (the rollout's prefill) gives the hidden states whose head is the cached
    call's logits, and the same cache."""
    model = Transformer(CFG, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    ids, mask = _batch()
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    cache = model.init_cache(3, ids.shape[1], dtype=jnp.float32)
    logits, c1 = model(ids, positions=positions, cache=cache, cache_index=0, kv_mask=mask)
    hidden, c2 = model.trunk(ids, positions=positions, cache=cache, cache_index=0, kv_mask=mask)
    np.testing.assert_allclose(model.logits(hidden), logits, atol=1e-6)
    np.testing.assert_array_equal(c1.k, c2.k)
