"""One Flax NNX decoder for Qwen2/2.5, Qwen3 and Llama 3.x (RMSNorm, RoPE, grouped-query attention,
SwiGLU), with an optional KV cache so training, scoring and the rollout engine share one module.

Layout choices, and why:
- Layer weights are stacked along a leading `layers` axis and the blocks run under `jax.lax.scan`
  (`mtgrpo_jax.loops.scan`, which `mtgrpo plan` unrolls to count every layer's cost): compile time
  stays flat in depth (a 28-layer model compiles like a 1-layer one) and the KV cache is naturally one
  `[L, B, S, Hkv, D]` array per k/v.
- Projection kernels keep heads as their own axis (`[L, H, N, D]`), so tensor parallelism over heads
  is a single partition rule instead of a reshaping convention.
- Every parameter carries `logical_axes` metadata; `mtgrpo_jax.parallel` maps those names to mesh
  axes, so the model itself never names a mesh.
- Numerics: weights and activations in `dtype` (bf16 by default); RMSNorm statistics, attention
  scores and softmax, and the logits are float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mtgrpo_jax import loops
from mtgrpo_jax.models import decode
from mtgrpo_jax.models.attention import attend, causal_attention, resolve_attention
from mtgrpo_jax.models.config import ModelConfig
from mtgrpo_jax.models.layers import apply_rope, rms_norm, rope_inv_freq
from mtgrpo_jax.parallel.sharding import divisible_spec, mesh_axis_sizes

# Activation axis name -> mesh axes. Constraints are applied only when a mesh with these axis names
# is active (`jax.set_mesh`), so the same module runs unsharded on one device.
ACTIVATION_AXES = {
    "batch": ("data", "fsdp"),
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
}


class KVCache(NamedTuple):
    """Keys and values of every layer, `[L, B, S, Hkv, D]` each (a pytree, donate it under jit)."""

    k: jax.Array
    v: jax.Array


def activation_spec(shape: tuple[int, ...], axes: tuple[str | None, ...], mesh) -> jax.sharding.PartitionSpec:
    """PartitionSpec of an activation by its axis names on `mesh` (see `parallel.divisible_spec`)."""
    return divisible_spec(shape, [ACTIVATION_AXES.get(name) if name else None for name in axes], mesh_axis_sizes(mesh))


def shard_activation(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """`with_sharding_constraint` by activation axis names when a (data, fsdp, tensor) mesh is active.

    Dimensions that the mesh axes do not divide stay unconstrained (e.g. a batch of 1 in a decode
    step), which keeps odd shapes working instead of failing on a divisibility error."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = activation_spec(x.shape, axes, mesh)
    if all(s is None for s in spec):
        return x
    return jax.lax.with_sharding_constraint(x, spec)


def _replicated(x: jax.Array) -> jax.Array:
    """Gathers a (vocab x embed sharded) table before a row lookup when a mesh is active: the SPMD
    partitioner cannot turn a gather from a 2-D sharded table into a batch-sharded result without a
    full rematerialisation, while one all-gather of the table (what FSDP does for every weight) is cheap."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec())


def _param(rngs: nnx.Rngs, shape, axes, dtype, init: str = "normal") -> nnx.Param:
    if init == "normal":  # HF initializer_range 0.02, so random-init models look like HF's
        value = 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        value = jnp.zeros(shape, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=tuple(axes))


# `jax.checkpoint_policies` entries that are policies themselves (the others are factories needing names).
_POLICY_NAMES = (
    "nothing_saveable",
    "everything_saveable",
    "dots_saveable",
    "checkpoint_dots",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots_with_no_batch_dims",
)
REMAT_CHOICES = ("none", "block") + tuple(n for n in _POLICY_NAMES if hasattr(jax.checkpoint_policies, n))


def remat_name(remat: bool | str) -> str:
    """Validates a rematerialisation setting: "none", "block" (recompute each decoder block in the backward
    pass, saving only its input), or a `jax.checkpoint_policies` name (checkpoint each block under that
    policy, e.g. "dots_with_no_batch_dims_saveable" keeps the weight matmuls' outputs). True/False mean
    "block"/"none"."""
    if isinstance(remat, bool):
        return "block" if remat else "none"
    if remat not in REMAT_CHOICES:
        raise ValueError(f"unknown remat {remat!r} (known: {', '.join(REMAT_CHOICES)})")
    return remat


def _remat(fn, remat: bool | str):
    name = remat_name(remat)
    if name == "none":
        return fn
    policy = None if name == "block" else getattr(jax.checkpoint_policies, name)
    return jax.checkpoint(fn, policy=policy)


class DecoderLayers(nnx.Module):
    """All decoder blocks' weights, stacked on a leading `layers` axis (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype):
        L, H, D, I = cfg.num_hidden_layers, cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
        Nq, Nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        p = lambda shape, axes, init="normal": _param(rngs, shape, axes, param_dtype, init)  # noqa: E731
        self.input_norm = p((L, H), ("layers", "norm"), "ones")
        self.q_proj = p((L, H, Nq, D), ("layers", "embed", "heads", "head_dim"))
        self.k_proj = p((L, H, Nkv, D), ("layers", "embed", "kv_heads", "head_dim"))
        self.v_proj = p((L, H, Nkv, D), ("layers", "embed", "kv_heads", "head_dim"))
        self.o_proj = p((L, Nq, D, H), ("layers", "heads", "head_dim", "embed"))
        if cfg.attention_bias:
            self.q_bias = p((L, Nq, D), ("layers", "heads", "head_dim"), "zeros")
            self.k_bias = p((L, Nkv, D), ("layers", "kv_heads", "head_dim"), "zeros")
            self.v_bias = p((L, Nkv, D), ("layers", "kv_heads", "head_dim"), "zeros")
        if cfg.o_proj_bias:
            self.o_bias = p((L, H), ("layers", "norm"), "zeros")
        if cfg.qk_norm:
            self.q_norm = p((L, D), ("layers", "norm"), "ones")
            self.k_norm = p((L, D), ("layers", "norm"), "ones")
        self.post_attn_norm = p((L, H), ("layers", "norm"), "ones")
        self.gate_proj = p((L, H, I), ("layers", "embed", "mlp"))
        self.up_proj = p((L, H, I), ("layers", "embed", "mlp"))
        self.down_proj = p((L, I, H), ("layers", "mlp", "embed"))

    def weights(self) -> dict[str, jax.Array]:
        return {name: var[...] for name, var in vars(self).items() if isinstance(var, nnx.Param)}


class Transformer(nnx.Module):
    """Decoder-only LM. See `mtgrpo_jax/models/__init__.py` for the call contract.

    `remat` ("none", "block" or a `jax.checkpoint_policies` name, see `remat_name`) rematerialises each
    block in the backward pass (activation memory O(1) in depth). `attention` picks the uncached forward's
    attention implementation ("auto", "xla", "splash", "cudnn"; see `mtgrpo_jax.models.attention`); the
    cached path (rollout prefill and decode) always uses explicit scores over the cache."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16,
        remat: bool | str = "none",
        attention: str = "auto",
    ):
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype)
        self.remat = remat_name(remat)
        resolve_attention(attention)  # validates the name now; "auto" is resolved when traced
        self.attention = attention
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype)
        self.layers = DecoderLayers(cfg, rngs=rngs, param_dtype=param_dtype)
        self.final_norm = _param(rngs, (cfg.hidden_size,), ("norm",), param_dtype, "ones")
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), param_dtype)

    # ------------------------------------------------------------------ public API
    def __call__(
        self,
        input_ids,
        positions=None,
        attention_mask=None,
        *,
        cache: KVCache | None = None,
        cache_index=None,
        kv_mask=None,
    ):
        """float32 logits `[B, T, V]` for int32 ids `[B, T]`; with `cache`, `(logits, new_cache)`.

        Without a cache: `attention_mask` bool `[B, T]` (left padding allowed), positions default to
        cumsum(mask) - 1 clipped at 0. With a cache: the T tokens go to slots [cache_index,
        cache_index + T) (which must fit in the cache); query t attends slot s iff
        s <= cache_index + t and kv_mask[b, s]; positions default to cache_index + arange(T)."""
        hidden, new_cache = self._forward(input_ids, positions, attention_mask, cache, cache_index, kv_mask)
        logits = self.logits(hidden)
        return logits if cache is None else (logits, new_cache)

    def trunk(
        self,
        input_ids,
        positions=None,
        attention_mask=None,
        *,
        cache: KVCache | None = None,
        cache_index=None,
        kv_mask=None,
    ):
        """Final-norm hidden states `[B, T, H]` (activation dtype) before the LM head, e.g. for chunked
        log-probs or a prefill that runs the head on its last position only; with `cache` (same contract
        as `__call__`), `(hidden, new_cache)`."""
        hidden, new_cache = self._forward(input_ids, positions, attention_mask, cache, cache_index, kv_mask)
        return hidden if cache is None else (hidden, new_cache)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits `[B, T, V]` from `trunk` output (tied embedding or separate lm_head)."""
        if self.config.tie_word_embeddings:
            w = self.embed[...].astype(self.dtype)
            out = jnp.einsum("bth,vh->btv", hidden, w, preferred_element_type=jnp.float32)
        else:
            w = self.lm_head[...].astype(self.dtype)
            out = jnp.einsum("bth,hv->btv", hidden, w, preferred_element_type=jnp.float32)
        return shard_activation(out, ("batch", None, "vocab"))

    def head_matrix(self) -> jax.Array:
        """The LM head as one `[H, V]` matrix in the activation dtype (the tied embedding transposed), so
        callers can apply it in slices (`mtgrpo_jax.rl.token_logprobs_from_hidden`) instead of via `logits`."""
        if self.config.tie_word_embeddings:
            return self.embed[...].astype(self.dtype).T
        return self.lm_head[...].astype(self.dtype)

    def init_cache(self, batch_size: int, max_len: int, dtype=jnp.bfloat16) -> KVCache:
        cfg = self.config
        shape = (cfg.num_hidden_layers, batch_size, max_len, cfg.num_key_value_heads, cfg.head_dim)
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    # ------------------------------------------------------------------ one-token decoding
    # The rollout's decode loop: a per-layer cache in the layout a one-token step wants, the prompts' k/v
    # held once per prompt, the generated slots in blocks (see `mtgrpo_jax.models.decode`).
    def decode_cache_shapes(self, prompts: int, n: int, length: int, block: int | None = None):
        """Shapes of one layer's `DecodeCache` k and v blocks for `prompts` prompts of `n` samples each and
        `length` generated slots."""
        return decode.cache_shapes(self.config, prompts, n, length, block)

    def decode_weights(self, positions: int | None = None) -> dict:
        """The weights a decode step reads, prepared once before the loop (2-D, activation dtype), and
        the rotary table of positions [0, `positions`) (default `max_position_embeddings`)."""
        return decode.prepare_weights(self, positions)

    def decode_prefix(self, cache: KVCache, prompt_mask, dtype) -> decode.Prefix:
        """The prompts' k/v from a prefilled `KVCache` (`trunk(..., cache=...)`), once per prompt."""
        return decode.prefix_from_model_cache(cache, prompt_mask, dtype)

    def decode_step(
        self,
        weights: dict,
        prefix: decode.Prefix,
        cache: decode.DecodeCache,
        tokens,
        positions,
        slot,
        *,
        blocks: int | None = None,
        first_block: int = 0,
        attention_kernel: bool = True,
    ):
        """One token per row (rows prompt-major: row = prompt * n + sample) -> (float32 logits `[B, V]`,
        cache); see `mtgrpo_jax.models.decode.step`."""
        return decode.step(
            self,
            weights,
            prefix,
            cache,
            tokens,
            positions,
            slot,
            blocks=blocks,
            first_block=first_block,
            attention_kernel=attention_kernel,
        )

    # ------------------------------------------------------------------ internals
    def _forward(self, input_ids, positions, attention_mask, cache, cache_index, kv_mask):
        cfg = self.config
        input_ids = jnp.asarray(input_ids, jnp.int32)
        b, t = input_ids.shape
        if cache is None:
            attention_mask = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
            if positions is None:
                positions = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
            mask = attention_mask  # [B, T]: causal attention over the valid positions
        else:
            if kv_mask is None and attention_mask is not None:
                raise ValueError("with a cache, pass kv_mask (valid cache slots, [B, S]) instead of attention_mask")
            cache_index = jnp.asarray(0 if cache_index is None else cache_index, jnp.int32)
            s = cache.k.shape[2]
            if positions is None:
                positions = jnp.broadcast_to(cache_index + jnp.arange(t, dtype=jnp.int32), (b, t))
            if kv_mask is None:
                kv_mask = jnp.ones((b, s), bool)
            query_slot = cache_index + jnp.arange(t)
            mask = (jnp.arange(s)[None, :] <= query_slot[:, None])[None] & jnp.asarray(kv_mask, bool)[:, None, :]
        positions = jnp.asarray(positions, jnp.int32)

        angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))  # [B, T, D/2]
        cos, sin = jnp.cos(angles), jnp.sin(angles)

        x = jnp.take(_replicated(self.embed[...]), input_ids, axis=0).astype(self.dtype)
        x = shard_activation(x, ("batch", None, None))
        weights = self.layers.weights()
        block = _remat(self._block, self.remat)

        if cache is None:

            def step(x, w):
                x, _ = block(w, x, cos, sin, mask, None, None, None)
                return x, None

            x, _ = loops.scan(step, x, weights)
            new_cache = None
        else:

            def step(carry, xs):
                x, k_all, v_all = carry
                w, layer = xs
                x, (k_all, v_all) = block(w, x, cos, sin, mask, (k_all, v_all), layer, cache_index)
                return (x, k_all, v_all), None

            layers = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)
            (x, k_all, v_all), _ = loops.scan(step, (x, cache.k, cache.v), (weights, layers))
            new_cache = KVCache(k_all, v_all)

        x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
        return x, new_cache

    def _block(self, w, x, cos, sin, mask, kv, layer, cache_index):
        """One pre-norm decoder block. With `kv` (the full stacked cache) the new k/v are written at
        slots [cache_index, cache_index + T) of `layer` and attention reads that layer's slots under
        `mask` [B, T, S]; without, `mask` is the valid positions [B, T] and attention is causal."""
        cfg, dt = self.config, self.dtype
        w = {k: v.astype(dt) for k, v in w.items()}
        h = rms_norm(x, w["input_norm"], cfg.rms_norm_eps)
        q = jnp.einsum("bth,hnd->btnd", h, w["q_proj"])
        k = jnp.einsum("bth,hnd->btnd", h, w["k_proj"])
        v = jnp.einsum("bth,hnd->btnd", h, w["v_proj"])
        if cfg.attention_bias:
            q, k, v = q + w["q_bias"], k + w["k_bias"], v + w["v_bias"]
        if cfg.qk_norm:
            q = rms_norm(q, w["q_norm"], cfg.rms_norm_eps)
            k = rms_norm(k, w["k_norm"], cfg.rms_norm_eps)
        q = shard_activation(apply_rope(q, cos, sin), ("batch", None, "heads", None))
        k = shard_activation(apply_rope(k, cos, sin), ("batch", None, "kv_heads", None))
        v = shard_activation(v, ("batch", None, "kv_heads", None))

        if kv is not None:
            k_all, v_all = kv
            start = (layer, 0, cache_index, 0, 0)
            # pinned so the partitioner keeps the cache layout stable across decode steps
            cache_axes = (None, "batch", None, "kv_heads", None)
            k_all = shard_activation(
                jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), start), cache_axes
            )
            v_all = shard_activation(
                jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), start), cache_axes
            )
            k_ctx = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False).astype(dt)
            v_ctx = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False).astype(dt)
            kv = (k_all, v_all)
            attn = attend(q, k_ctx, v_ctx, mask)
        else:  # no cache: `mask` is the [B, T] valid positions, attention is causal
            attn = causal_attention(q, k, v, mask, self.attention)
        out = jnp.einsum("btnd,ndh->bth", attn, w["o_proj"])
        if cfg.o_proj_bias:
            out = out + w["o_bias"]
        x = shard_activation(x + out, ("batch", None, None))

        h = rms_norm(x, w["post_attn_norm"], cfg.rms_norm_eps)
        gate = jnp.einsum("bth,hi->bti", h, w["gate_proj"])
        up = jnp.einsum("bth,hi->bti", h, w["up_proj"])
        hidden = shard_activation(jax.nn.silu(gate) * up, ("batch", None, "mlp"))
        x = shard_activation(x + jnp.einsum("bti,ih->bth", hidden, w["down_proj"]), ("batch", None, None))
        return x, kv
