"""A decode step specialised for one new token per row, for `mtgrpo_jax.models.Transformer`.

Why this exists next to `Transformer.__call__(..., cache=...)`: the model's cache layout
`[L, B, S, Hkv, D]` and its layer `scan` are right for prefill and training, but in a one-token
decode step on XLA:CPU they cost more than the matmuls: attention's batched dot wants `[B, Hkv, S, D]`
so every layer transposes (copies) its whole k and v cache every step, and the scan dynamic-slices
every layer's weights and cache (more copies). Measured on the 100M-parameter benchmark shape
(512 rows, 192 slots, 4 kv heads, float32, one layer): q.k^T took 71 ms with k as `[B, S, Hkv, D]`
(plus the transpose copy) and 10 ms with k as `[B, Hkv, D, S]`; p.v took 4 ms with v as
`[B, Hkv, S, D]`.

So the sampler keeps its own decode cache, one array per layer: k as `[B, Hkv, D, S]` (contraction
dim major, the layout the CPU batched matmul wants) and v as `[B, Hkv, S, D]`, each updated in place
with `dynamic_update_slice`; per-layer weight slices taken once before the decode loop; the layers
unrolled in the loop body. The math is the model's block, reusing its own
`rms_norm`, `apply_rope` and `rope_inv_freq` and its `logits` head; the tests check greedy decoding
against the model's full no-cache forward for every family, so the two cannot drift silently.
Prefill still runs the model's own cached forward (its `_forward`, so that only the last position
goes through the vocabulary head); its cache is transposed into this layout once per `generate`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtgrpo_jax.models import transformer as tfm

_MASK_VALUE = float(np.finfo(np.float32).min)


class DecodeCache(NamedTuple):
    """Per-layer keys `[B, Hkv, D, S]` and values `[B, Hkv, S, D]`, each a tuple of L arrays."""

    k: tuple
    v: tuple


def supports(model) -> bool:
    """Whether `model` is the project's Transformer with the internals this fast path reads."""
    return (isinstance(model, tfm.Transformer) and hasattr(model, "layers") and hasattr(model.layers, "weights")
            and hasattr(model, "_forward"))


def cache_shapes(model, rows: int, length: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of one layer's k and v decode cache."""
    cfg = model.config
    return (rows, cfg.num_key_value_heads, cfg.head_dim, length), (rows, cfg.num_key_value_heads, length, cfg.head_dim)


def prepare_weights(model) -> dict:
    """What the decode loop reads, taken once before the loop: each layer's weights as separate arrays
    (static slices of the stacked parameters, cast to the activation dtype as the model's block does)
    and the embedding table, replicated when a mesh is active (a row gather from a vocab-sharded table
    would otherwise be re-gathered on every step; the model does the same per forward)."""
    stacked = model.layers.weights()
    dt = model.dtype
    embed = model.embed[...]
    if not jax.sharding.get_abstract_mesh().empty:
        embed = jax.lax.with_sharding_constraint(embed, jax.sharding.PartitionSpec())
    layers = [{name: w[i].astype(dt) for name, w in stacked.items()} for i in range(model.config.num_hidden_layers)]
    return {"layers": layers, "embed": embed}


def prefill_last_logits(model, prompt_ids, positions, cache, kv_mask):
    """Prefill the prompts into the model's `cache` and return float32 logits of the last slot only.

    The public cached call returns logits for every prompt position, `[B, P, V]` float32: 80 GB for
    128 prompts of 1024 tokens with a 152k vocabulary, all but the last column thrown away (XLA does
    not push the slice through the head matmul). The model's `_forward` gives the hidden states, so
    the head runs on the last position only. (Private API: see /work/notes/rollout_needs.md.)"""
    hidden, cache = model._forward(prompt_ids, positions, None, cache, jnp.int32(0), kv_mask)
    return model.logits(hidden[:, -1:])[:, 0], cache


def from_model_cache(model_cache, full: DecodeCache, n: int) -> DecodeCache:
    """Writes a prefilled model cache `[L, B, P, Hkv, D]` into slots [0, P) of `full` (rows B*n,
    prompt b's k/v repeated for its n samples), in place when `full` is donated."""
    def put(dst, src, perm):
        src = jnp.repeat(jnp.transpose(src, perm), n, axis=0).astype(dst.dtype)
        return jax.lax.dynamic_update_slice(dst, src, (0, 0, 0, 0))
    layers = range(len(full.k))
    return DecodeCache(tuple(put(full.k[i], model_cache.k[i], (0, 2, 3, 1)) for i in layers),  # [B, Hkv, D, P]
                       tuple(put(full.v[i], model_cache.v[i], (0, 2, 1, 3)) for i in layers))  # [B, Hkv, P, D]


def step(model, weights, cache: DecodeCache, tokens, positions, slot, kv_mask):
    """One token per row: `tokens` int32 [B] at `positions` [B], written at cache `slot` (scalar);
    `weights` from `prepare_weights`.

    Row b attends to slots s <= slot with kv_mask[b, s]. Returns float32 logits [B, V] and the cache."""
    cfg, dt = model.config, model.dtype
    b = tokens.shape[0]
    angles = positions.astype(jnp.float32)[:, None, None] * jnp.asarray(tfm.rope_inv_freq(cfg))  # [B, 1, D/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x = jnp.take(weights["embed"], tokens, axis=0).astype(dt)  # [B, H]
    s_len = cache.v[0].shape[2]
    mask = kv_mask & (jnp.arange(s_len)[None, :] <= slot)  # [B, S]
    nkv, d = cfg.num_key_value_heads, cfg.head_dim
    group = cfg.num_attention_heads // nkv
    new_k, new_v = [], []

    def mm(spec, a, b):
        # float32 accumulation then one rounding to the activation dtype: the same numbers as a
        # plain low-precision einsum, but XLA:CPU runs bf16 x bf16 -> f32 dots in its fast kernels
        # instead of converting whole operands to f32 first.
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(dt)

    for w, k_cache, v_cache in zip(weights["layers"], cache.k, cache.v):
        h = tfm.rms_norm(x, w["input_norm"], cfg.rms_norm_eps)
        q = mm("bh,hnd->bnd", h, w["q_proj"])
        k = mm("bh,hnd->bnd", h, w["k_proj"])
        v = mm("bh,hnd->bnd", h, w["v_proj"])
        if cfg.attention_bias:
            q, k, v = q + w["q_bias"], k + w["k_bias"], v + w["v_bias"]
        if cfg.qk_norm:
            q = tfm.rms_norm(q, w["q_norm"], cfg.rms_norm_eps)
            k = tfm.rms_norm(k, w["k_norm"], cfg.rms_norm_eps)
        q = tfm.apply_rope(q[:, None], cos, sin)[:, 0]
        k = tfm.apply_rope(k[:, None], cos, sin)[:, 0]
        k_cache = jax.lax.dynamic_update_slice(k_cache, k[:, :, :, None].astype(k_cache.dtype), (0, 0, 0, slot))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v[:, :, None, :].astype(v_cache.dtype), (0, 0, slot, 0))
        new_k.append(k_cache)
        new_v.append(v_cache)

        qg = q.reshape(b, nkv, group, d)
        scores = jnp.einsum("bkgd,bkds->bkgs", qg, k_cache.astype(dt), preferred_element_type=jnp.float32) * (d**-0.5)
        scores = jnp.where(mask[:, None, None, :], scores, _MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        attn = mm("bkgs,bksd->bkgd", probs, v_cache.astype(dt)).reshape(b, nkv * group, d)
        out = mm("bnd,ndh->bh", attn, w["o_proj"])
        if cfg.o_proj_bias:
            out = out + w["o_bias"]
        x = x + out
        h = tfm.rms_norm(x, w["post_attn_norm"], cfg.rms_norm_eps)
        gate = mm("bh,hi->bi", h, w["gate_proj"])
        up = mm("bh,hi->bi", h, w["up_proj"])
        x = x + mm("bi,ih->bh", jax.nn.silu(gate) * up, w["down_proj"])
    x = tfm.rms_norm(x, model.final_norm[...], cfg.rms_norm_eps)
    logits = model.logits(x[:, None])[:, 0]
    return logits, DecodeCache(tuple(new_k), tuple(new_v))
