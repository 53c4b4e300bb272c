"""The one-token decode step of `Transformer` (its public `decode_*` methods), for the rollout's loop.

Why a step specialised for one new token per row, next to the uncached / prefill forward: the
`[L, B, S, Hkv, D]` cache layout and the layer `scan` are right for prefill and training, but in a
one-token decode step on XLA:CPU they cost more than the matmuls: attention's batched dot wants
`[B, Hkv, S, D]`, so every layer would transpose (copy) its whole k and v cache every step, and the
scan dynamic-slices every layer's weights and cache (more copies). So decoding keeps its own cache,
head-major: per layer, k as `[Bp, Hkv, n, D, S]` (contraction dim major, the layout the CPU batched
matmul wants) and v as `[Bp, Hkv, n, S, D]` for Bp prompts of n samples each, updated in place with
`dynamic_update_slice`; per-layer weights prepared once before the decode loop as plain 2-D matrices
(q|k|v and gate|up concatenated on one device); the layers unrolled in the loop body.

The prompts' k/v (`Prefix`) are held once per prompt, not once per sample: a step stacks the queries
of a prompt's n samples into one matrix per kv head and reads the prompt's keys and values once for
all of them (n times less prompt traffic, and no n-fold copy of the prompt cache). Because the
attention runs in the `[Bp, Hkv, n, ...]` order throughout, that stacking is a reshape, and every
attention dot has its batch dims leading in both operands: the step transposes only the queries in
and the attention output out (each `[B, Hq * D]`, small), never a score or probability tensor. The
softmax is normalised after the value sum, and on CPU the value sums are fused multiply-and-sums
rather than dots (`_value_sum`). On a single x86-64 CPU device with AVX2 and a float32 cache, all of
a layer's attention (prefix, generated blocks, softmax, value sums) is instead one custom call
(`mtgrpo_jax.models.kernels`), which streams each cache block once and skips the slots not yet
written; `_attention` is the same math in XLA ops, for every other case and as its reference.

The generated-token cache is cut into slot blocks (`block_sizes`; one block when `block` is None). A
step reads only the first `blocks` of them: the rollout runs its decode loop in phases, and a phase's
steps read the blocks written so far, not the whole static-length cache. On CPU small blocks also run
nearer the memory bandwidth (`mtgrpo bench rollout` measures the effect).

The block math reuses `layers` (RMSNorm, rotary embeddings) and the model's `logits` head; the tests
check greedy decoding against the model's full no-cache forward for every family and for several
block and phase layouts, so the two cannot drift silently.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtgrpo_jax.models import kernels, layers

_MASK_VALUE = float(np.finfo(np.float32).min)


class DecodeCache(NamedTuple):
    """Per layer, a tuple of slot blocks: keys `[Bp, Hkv, n, D, C_j]` and values `[Bp, Hkv, n, C_j, D]`
    (row prompt * n + sample is [prompt, :, sample]); block j holds slots [j * C, j * C + C_j) (see
    `block_sizes`)."""

    k: tuple
    v: tuple


def block_sizes(length: int, block: int | None) -> tuple[int, ...]:
    """Slot counts of the cache blocks for a cache of `length` slots (one block when `block` is None)."""
    block = length if block is None else block
    return tuple(min(block, length - start) for start in range(0, length, block))


def cache_shapes(cfg, prompts: int, n: int, length: int, block: int | None = None):
    """Shapes of one layer's k and v decode cache for `prompts` prompts of `n` samples each (`cfg` a
    ModelConfig): a tuple of block shapes each."""
    nkv, d = cfg.num_key_value_heads, cfg.head_dim
    sizes = block_sizes(length, block)
    return tuple((prompts, nkv, n, d, c) for c in sizes), tuple((prompts, nkv, n, c, d) for c in sizes)


def prepare_weights(model, positions: int | None = None) -> dict:
    """What the decode loop reads, prepared once before the loop.

    Per layer: the projections as plain 2-D matrices (heads flattened: `[H, N*D]`, o_proj
    `[N*D, H]`), so every matmul in the step is a 2-D dot with no layout shuffles; and, on a single
    device, q|k|v and gate|up concatenated into one matrix each (fewer, wider dots). With a mesh the
    projections stay separate, so each keeps its own tensor-parallel sharding. Everything is cast
    to the activation dtype as the model's block does. Also the embedding table, replicated when a
    mesh is active (a row gather from a vocab-sharded table would otherwise be re-gathered on every
    step; the model does the same per forward). And the rotary cos/sin of positions [0, `positions`)
    (default `max_position_embeddings`), which a step gathers: computed inside the step, XLA fuses cos
    and sin into each layer's q and k consumers and evaluates them once per element of every one of
    them (the same values either way)."""
    cfg, dt = model.config, model.dtype
    stacked = model.layers.weights()
    hidden, nd = cfg.hidden_size, cfg.head_dim
    single_device = jax.sharding.get_abstract_mesh().empty
    embed = model.embed[...]
    if not single_device:
        embed = jax.lax.with_sharding_constraint(embed, jax.sharding.PartitionSpec())
    per_layer = []
    for i in range(cfg.num_hidden_layers):
        w = {name: value[i].astype(dt) for name, value in stacked.items()}
        layer = {name: w[name] for name in ("input_norm", "post_attn_norm", "q_norm", "k_norm", "o_bias") if name in w}
        proj = {name: w[f"{name}_proj"].reshape(hidden, -1) for name in "qkv"}
        bias = {name: w[f"{name}_bias"].reshape(-1) for name in "qkv" if f"{name}_bias" in w}
        if single_device:
            layer["qkv"] = jnp.concatenate([proj["q"], proj["k"], proj["v"]], axis=1)
            if bias:
                layer["qkv_bias"] = jnp.concatenate([bias["q"], bias["k"], bias["v"]])
            layer["gate_up"] = jnp.concatenate([w["gate_proj"], w["up_proj"]], axis=1)
        else:
            layer.update(proj)
            layer.update({f"{name}_bias": value for name, value in bias.items()})
            layer["gate"], layer["up"] = w["gate_proj"], w["up_proj"]
        layer["o"] = w["o_proj"].reshape(cfg.num_attention_heads * nd, hidden)
        layer["down"] = w["down_proj"]
        per_layer.append(layer)
    length = cfg.max_position_embeddings if positions is None else int(positions)
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * jnp.asarray(layers.rope_inv_freq(cfg))
    return {"layers": per_layer, "embed": embed, "rope": (jnp.cos(angles), jnp.sin(angles))}


class Prefix(NamedTuple):
    """The prompts' keys `[Bp, Hkv, D, P]` and values `[Bp, Hkv, P, D]` per layer, held once per
    prompt (not per sample), and their mask `[Bp, P]`."""

    k: tuple
    v: tuple
    mask: jax.Array


def prefix_from_model_cache(model_cache, prompt_mask, dtype) -> Prefix:
    """The prefilled model cache `[L, Bp, P, Hkv, D]` in the decode layout, one copy per prompt."""
    layers = range(model_cache.k.shape[0])
    return Prefix(
        tuple(jnp.transpose(model_cache.k[i], (0, 2, 3, 1)).astype(dtype) for i in layers),
        tuple(jnp.transpose(model_cache.v[i], (0, 2, 1, 3)).astype(dtype) for i in layers),
        prompt_mask,
    )


def _write(blocks, new, slot, slot_axis: int, first: int, stop: int):
    """Writes `new` (size 1 along `slot_axis`) at cache `slot` (traced) into the block that holds
    it, looking only at blocks [first, stop) (the caller knows the slot is in one of them). When
    there are several, those that do not hold the slot get their own value back (a one-slot read
    and write each)."""
    out, start = list(blocks), 0
    candidates = range(first, stop)
    for j, block in enumerate(blocks):
        size = block.shape[slot_axis]
        if j in candidates:
            local = slot - start
            index = [0] * block.ndim
            if len(candidates) == 1:
                index[slot_axis] = local
                out[j] = jax.lax.dynamic_update_slice(block, new.astype(block.dtype), tuple(index))
            else:
                index[slot_axis] = jnp.clip(local, 0, size - 1)
                old = jax.lax.dynamic_slice(block, tuple(index), new.shape)
                inside = (local >= 0) & (local < size)
                value = jnp.where(inside, new.astype(block.dtype), old)
                out[j] = jax.lax.dynamic_update_slice(block, value, tuple(index))
        start += size
    return tuple(out)


def _value_sum(weights, values):
    """sum_s weights[b, k, i, g, s] * values[b, k, (i,) s, d] -> float32 `[Bp, Hkv, n, G, D]`, where
    `values` is a prompt's prefix `[Bp, Hkv, S, D]` (shared by its n samples) or a generated-token
    block `[Bp, Hkv, n, S, D]`.

    On CPU a fused multiply-and-sum: XLA:CPU runs these dots (a few rows each, batched over every
    prompt, kv head and sample) far below its memory bandwidth and mostly on one core, while the
    fused loop streams the values once and spreads over the cores. Elsewhere the batched dot, for
    the accelerators' matrix units."""
    bp, nkv, n, group, s = weights.shape
    shared = values.ndim == 4
    if jax.default_backend() == "cpu":
        values = values[:, :, None, None] if shared else values[:, :, :, None]
        return jnp.sum(weights[..., None].astype(jnp.float32) * values.astype(jnp.float32), axis=-2)
    if shared:
        out = jnp.einsum(
            "bkms,bksd->bkmd", weights.reshape(bp, nkv, n * group, s), values, preferred_element_type=jnp.float32
        )
        return out.reshape(bp, nkv, n, group, -1)
    return jnp.einsum("bkngs,bknsd->bkngd", weights, values, preferred_element_type=jnp.float32)


def _attention(qg, k_prefix, v_prefix, prefix_mask, slot, k_blocks, v_blocks):
    """softmax(q k^T / sqrt(d)) v over the prefix (where `prefix_mask`) and the generated slots 0..`slot`,
    with XLA ops: float32 `[Bp, Hkv, n, G, D]` (what `kernels.decode_attention` computes in one pass on CPU)."""
    bp, nkv, n, group, d = qg.shape
    att_dt = qg.dtype
    p_len = v_prefix.shape[2]
    window = sum(v.shape[3] for v in v_blocks)  # generated slots read this step
    # [Bp, 1, 1, 1, P+W]: a prompt's padding, and the generated slots written so far (the same for every row)
    written = jnp.broadcast_to(jnp.arange(window)[None, :] <= slot, (bp, window))
    mask = jnp.concatenate([prefix_mask, written], axis=1)[:, None, None, None, :]
    # The prefix: prompt i's n samples share its k/v, so their queries are one [n * G, D] matrix.
    prefix_scores = jnp.einsum(
        "bkmd,bkdp->bkmp",
        qg.reshape(bp, nkv, n * group, d),
        k_prefix.astype(att_dt),
        preferred_element_type=jnp.float32,
    ).reshape(bp, nkv, n, group, p_len)
    scores = jnp.concatenate(
        [prefix_scores]
        + [
            jnp.einsum("bkngd,bkndc->bkngc", qg, kb.astype(att_dt), preferred_element_type=jnp.float32)
            for kb in k_blocks
        ],
        axis=-1,
    )
    scores = jnp.where(mask, scores * (d**-0.5), _MASK_VALUE)
    # The softmax normalised after the value sum (one division per output, not per score).
    probs = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))  # unnormalised
    total = jnp.sum(probs, axis=-1, keepdims=True)
    probs = probs.astype(att_dt)
    attn = _value_sum(probs[..., :p_len], v_prefix.astype(att_dt))
    start = p_len
    for vb in v_blocks:
        size = vb.shape[3]
        attn = attn + _value_sum(probs[..., start : start + size], vb.astype(att_dt))
        start += size
    return attn / total


def step(
    model,
    weights,
    prefix: Prefix,
    cache: DecodeCache,
    tokens,
    positions,
    slot,
    *,
    blocks: int | None = None,
    first_block: int = 0,
    attention_kernel: bool = True,
):
    """One token per row: `tokens` int32 [B] at `positions` [B]; its k/v are written at slot
    `slot` (scalar, traced) of the generated-token cache. `weights` from `prepare_weights`; rows are
    prompt-major (row = prompt * n + sample, n = B / Bp, the cache's third dim).

    Row b attends to its prompt's prefix slots (where `prefix.mask`) and to generated slots
    s <= slot, reading only the first `blocks` cache blocks (all when None); the caller guarantees
    that `slot` lies in blocks [first_block, blocks). Each prompt's prefix is read once for its n
    samples: their queries are stacked into one matrix per prompt and kv head. On a single x86-64 CPU
    device with a float32 cache the attention is one custom call per layer (`kernels`; off with
    `attention_kernel=False`, or where the kernel is not available), elsewhere XLA ops (`_attention`).
    Returns float32 logits [B, V] and the cache."""
    cfg, dt = model.config, model.dtype
    b = tokens.shape[0]
    # [B, 1, D/2]; a position past the table gives NaN (jnp.take's fill), never a silently wrong angle
    cos, sin = (jnp.take(table, positions, axis=0)[:, None, :] for table in weights["rope"])
    x = jnp.take(weights["embed"], tokens, axis=0).astype(dt)  # [B, H]
    blocks = len(cache.k[0]) if blocks is None else blocks
    bp = prefix.mask.shape[0]
    n = b // bp
    nkv, d = cfg.num_key_value_heads, cfg.head_dim
    nq = cfg.num_attention_heads
    att_dt = jnp.promote_types(dt, prefix.k[0].dtype)
    single_device = jax.sharding.get_abstract_mesh().empty
    new_k, new_v = [], []

    def mm(a, w):
        # float32 accumulation then one rounding to the activation dtype: the same numbers as a
        # plain low-precision dot, but XLA:CPU runs bf16 x bf16 -> f32 dots in its fast kernels
        # instead of converting whole operands to f32 first.
        return jnp.dot(a, w, preferred_element_type=jnp.float32).astype(dt)

    def head_major(a, heads):  # [B, heads, ...] -> [Bp, Hkv, n, heads / Hkv, ...]
        a = a.reshape(bp, n, nkv, heads // nkv, *a.shape[2:])
        return jnp.swapaxes(a, 1, 2)

    for w, k_cache, v_cache, k_prefix, v_prefix in zip(weights["layers"], cache.k, cache.v, prefix.k, prefix.v):
        h = layers.rms_norm(x, w["input_norm"], cfg.rms_norm_eps)
        if "qkv" in w:
            qkv = mm(h, w["qkv"])
            if cfg.attention_bias:
                qkv = qkv + w["qkv_bias"]
            q, k, v = jnp.split(qkv, [nq * d, (nq + nkv) * d], axis=1)
        else:
            q, k, v = mm(h, w["q"]), mm(h, w["k"]), mm(h, w["v"])
            if cfg.attention_bias:
                q, k, v = q + w["q_bias"], k + w["k_bias"], v + w["v_bias"]
        q, k, v = q.reshape(b, nq, d), k.reshape(b, nkv, d), v.reshape(b, nkv, d)
        if cfg.qk_norm:
            q = layers.rms_norm(q, w["q_norm"], cfg.rms_norm_eps)
            k = layers.rms_norm(k, w["k_norm"], cfg.rms_norm_eps)
        q = layers.apply_rope(q[:, None], cos, sin)[:, 0]
        k = layers.apply_rope(k[:, None], cos, sin)[:, 0]
        k, v = head_major(k, nkv)[:, :, :, 0], head_major(v, nkv)[:, :, :, 0]  # [Bp, Hkv, n, D]
        k_cache = _write(k_cache, k[..., None], slot, 4, first_block, blocks)
        v_cache = _write(v_cache, v[..., None, :], slot, 3, first_block, blocks)
        new_k.append(k_cache)
        new_v.append(v_cache)

        # Attention runs in the wider of the activation and cache dtypes: the model's math when they
        # match; with a float32 cache under bf16 weights (faster on CPU, whose bf16 batched dots are
        # slow) no per-step cast of the whole cache.
        qg = head_major(q, nq).astype(att_dt)  # [Bp, Hkv, n, G, D]: query head k * G + g reads kv head k
        attn = None
        if attention_kernel and single_device:  # the CPU kernel where it applies (None elsewhere)
            attn = kernels.decode_attention(
                qg, k_prefix, v_prefix, prefix.mask, slot, k_cache[:blocks], v_cache[:blocks], d**-0.5
            )
        if attn is None:
            attn = _attention(qg, k_prefix, v_prefix, prefix.mask, slot, k_cache[:blocks], v_cache[:blocks])
        attn = jnp.swapaxes(attn, 1, 2).reshape(b, nq * d)  # back to row-major [B, Hq * D]
        out = mm(attn.astype(dt), w["o"])
        if cfg.o_proj_bias:
            out = out + w["o_bias"]
        x = x + out
        h = layers.rms_norm(x, w["post_attn_norm"], cfg.rms_norm_eps)
        if "gate_up" in w:
            gate, up = jnp.split(mm(h, w["gate_up"]), 2, axis=1)
        else:
            gate, up = mm(h, w["gate"]), mm(h, w["up"])
        x = x + mm(jax.nn.silu(gate) * up, w["down"])
    x = layers.rms_norm(x, model.final_norm[...], cfg.rms_norm_eps)
    logits = model.logits(x[:, None])[:, 0]
    return logits, DecodeCache(tuple(new_k), tuple(new_v))
