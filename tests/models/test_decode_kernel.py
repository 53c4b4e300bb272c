"""The CPU decode-attention kernel (`mtgrpo_jax.models.kernels`) against the decode step's XLA ops.

The kernel is built on first use; where it cannot be (no compiler, no AVX2/FMA) these tests skip and
the decode step uses the XLA ops (the fallback test below checks that path)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtgrpo_jax.models import decode, kernels

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="CPU attention kernel not available here")

# (prompts, kv heads, n, group, head dim, prefix, block sizes, blocks read, slot)
CASES = [
    (4, 4, 8, 3, 64, 64, (32, 32, 32, 32), 3, 70),  # the 100M bench's shapes, slot inside block 2
    (2, 2, 2, 2, 8, 8, (5, 5, 3), 3, 12),  # tiny head dim, odd blocks, last slot of the last block
    (3, 1, 1, 7, 24, 13, (16,), 1, 0),  # the first generated slot; rows not a multiple of the tile
    (1, 3, 5, 1, 40, 3, (8, 8), 2, 9),  # head dim not a multiple of 16, one prefix slot per vector lane
    (2, 2, 3, 4, 128, 37, (32, 32), 1, 31),  # a block read in full; wide heads
]


def _inputs(case, seed, masked):
    bp, nkv, n, g, d, p, sizes, blocks, slot = case
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.normal(size=shape).astype(np.float32) * 2.0)  # noqa: E731
    q = f(bp, nkv, n, g, d)
    k_pre, v_pre = f(bp, nkv, d, p), f(bp, nkv, p, d)
    mask = np.ones((bp, p), bool)
    if masked:  # left padding of varied length; prompt 0 keeps a single valid slot
        for i in range(bp):
            mask[i, : rng.integers(0, p) if i else p - 1] = False
    k_blocks = tuple(f(bp, nkv, n, d, c) for c in sizes[:blocks])
    v_blocks = tuple(f(bp, nkv, n, c, d) for c in sizes[:blocks])
    return q, k_pre, v_pre, jnp.asarray(mask), slot, k_blocks, v_blocks


@needs_kernel
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_kernel_matches_the_xla_attention(case, masked):
    q, k_pre, v_pre, mask, slot, k_blocks, v_blocks = _inputs(case, seed=len(str(case)) + masked, masked=masked)
    want = np.asarray(jax.jit(decode._attention)(q, k_pre, v_pre, mask, slot, k_blocks, v_blocks))
    call = jax.jit(lambda *a: kernels.decode_attention(*a[:5], a[5], a[6], q.shape[-1] ** -0.5))
    got = np.asarray(call(q, k_pre, v_pre, mask, jnp.int32(slot), k_blocks, v_blocks))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@needs_kernel
def test_kernel_ignores_unwritten_slots_and_masked_prefix():
    """Slots after `slot` and masked prefix slots get weight 0 whatever they hold (NaN included)."""
    case = (2, 2, 2, 3, 16, 6, (8, 8), 2, 10)
    q, k_pre, v_pre, mask, slot, k_blocks, v_blocks = _inputs(case, seed=3, masked=True)
    want = np.asarray(kernels.decode_attention(q, k_pre, v_pre, mask, slot, k_blocks, v_blocks, 0.25))
    poison = lambda x, sl: x.at[sl].set(jnp.nan)  # noqa: E731
    k_blocks = (k_blocks[0], poison(k_blocks[1], (..., slice(3, None))))
    v_blocks = (v_blocks[0], poison(v_blocks[1], (..., slice(3, None), slice(None))))
    k_pre = jnp.where(mask[:, None, None, :], k_pre, jnp.nan)
    got = np.asarray(kernels.decode_attention(q, k_pre, v_pre, mask, slot, k_blocks, v_blocks, 0.25))
    assert np.isfinite(got).all()
    # v at masked prefix slots is multiplied by weight 0: finite values there leave the output as is
    np.testing.assert_array_equal(got, want)


def test_decode_attention_falls_back_without_the_kernel(monkeypatch):
    """Turned off or unbuildable, `decode_attention` answers None and the step runs its XLA ops, to the
    same logits as with the kernel (where there is one)."""
    from flax import nnx

    from mtgrpo_jax.models import ModelConfig, Transformer

    cfg = ModelConfig(
        model_type="qwen2", vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = Transformer(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    bp, n, p, m = 2, 3, 5, 12
    rng = np.random.default_rng(0)
    k_shapes, v_shapes = decode.cache_shapes(cfg, bp, n, m, block=4)
    cache = decode.DecodeCache(
        tuple(tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in k_shapes) for _ in range(2)),
        tuple(tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in v_shapes) for _ in range(2)),
    )
    prefix = decode.Prefix(
        tuple(jnp.asarray(rng.normal(size=(bp, 2, 8, p)), jnp.float32) for _ in range(2)),
        tuple(jnp.asarray(rng.normal(size=(bp, 2, p, 8)), jnp.float32) for _ in range(2)),
        jnp.asarray([[True] * p, [False, False, True, True, True]]),
    )
    weights = decode.prepare_weights(model, p + m)
    tokens, positions = jnp.arange(bp * n, dtype=jnp.int32), jnp.full((bp * n,), p + 6, jnp.int32)

    def logits(use_kernel):
        return np.asarray(
            decode.step(model, weights, prefix, cache, tokens, positions, jnp.int32(6), attention_kernel=use_kernel)[0]
        )

    with_kernel = logits(True)
    monkeypatch.setattr(kernels, "available", lambda: False)
    q, k_pre, v_pre, mask, slot, k_blocks, v_blocks = _inputs(CASES[1], seed=0, masked=False)
    assert kernels.decode_attention(q, k_pre, v_pre, mask, slot, k_blocks, v_blocks, 0.5) is None
    np.testing.assert_allclose(logits(True), with_kernel, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits(False), with_kernel, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kernel_declines_what_it_does_not_compute():
    """Only float32 operands: a bf16 query or cache gets None (the step then uses its XLA ops)."""
    q, k_pre, v_pre, mask, slot, k_blocks, v_blocks = _inputs(CASES[1], seed=0, masked=False)
    assert kernels.decode_attention(q.astype(jnp.bfloat16), k_pre, v_pre, mask, slot, k_blocks, v_blocks, 0.5) is None
    bf16_blocks = tuple(k.astype(jnp.bfloat16) for k in k_blocks)
    assert kernels.decode_attention(q, k_pre, v_pre, mask, slot, bf16_blocks, v_blocks, 0.5) is None
    assert kernels.decode_attention(q, k_pre, v_pre, mask, slot, k_blocks, v_blocks, 0.5) is not None
