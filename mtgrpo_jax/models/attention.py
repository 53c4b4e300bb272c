"""Causal self-attention over a left-padded batch, by one of several implementations.

`causal_attention(q, k, v, valid, implementation)` is what the model's uncached forward (training, scoring,
the improvement forward) calls. Every implementation computes the same function:

    out[b, t] = softmax over s <= t with valid[b, s] of q[b, t] . k[b, s] / sqrt(D), applied to v
    out[b, t] = 0 where valid[b, t] is False (a padding query attends to nothing)

- "xla": the explicit scores `[B, Hkv, G, T, T]` in float32 (the reference; the CPU path).
- "splash": JAX's Pallas TPU splash-attention kernel (causal mask, left padding as segment ids), run per
  shard under `shard_map` over the active mesh's batch and head axes. Never materialises the scores.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` (GPU flash attention). cuDNN expresses
  padding only as sequence lengths (right padding), so each row is rotated to put its padding at the end
  (positions are already in the rotary embedding, so attention does not care where a token sits) and
  rotated back afterwards.
- "auto": splash on TPU, cudnn on GPU, xla elsewhere (`resolve_attention`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mtgrpo_jax.parallel.sharding import divisible_spec, mesh_axis_sizes

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")
_BY_PLATFORM = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "rocm": "xla", "cpu": "xla"}
_MASK_VALUE = float(np.finfo(np.float32).min)  # finite, so fully masked (pad) rows give no NaN
_BATCH_AXES = ("data", "fsdp")
_HEAD_AXIS = "tensor"


def target_platform() -> str:
    """The platform being compiled for: the active mesh's devices' (so a program lowered ahead of time
    under a TPU topology's mesh on a CPU-only machine counts as TPU), else JAX's default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def resolve_attention(implementation: str, platform: str | None = None) -> str:
    """The concrete implementation for `implementation` ("auto" picks by `platform`, by default
    `target_platform()`)."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r} (known: {', '.join(ATTENTION_IMPLEMENTATIONS)})"
        )
    if implementation != "auto":
        return implementation
    return _BY_PLATFORM.get(platform or target_platform(), "xla")


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention with an explicit mask. q `[B, T, Nq, D]`, k/v `[B, S, Nkv, D]`, mask bool
    `[B, T, S]`. Query heads are grouped onto their kv head by a reshape, so k/v are never repeated."""
    b, t, nq, d = q.shape
    nkv = k.shape[2]
    q = q.reshape(b, t, nkv, nq // nkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * (d**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, nq, d)


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    valid: jax.Array,
    implementation: str = "xla",
    *,
    interpret: bool | None = None,
    block: int | None = None,
) -> jax.Array:
    """Causal grouped-query self-attention of a left-padded batch (see the module docstring).

    q `[B, T, Nq, D]`, k/v `[B, T, Nkv, D]`, valid bool `[B, T]`. `interpret` runs the splash kernel in the
    Pallas interpreter (default: when the target platform is not a TPU, e.g. the CPU tests); `block`
    overrides its block size (a multiple of 128)."""
    implementation = resolve_attention(implementation)
    if interpret is None:
        interpret = target_platform() != "tpu"
    valid = jnp.asarray(valid, bool)
    if implementation == "xla":
        t = q.shape[1]
        mask = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]
        out = attend(q, k, v, mask)
    elif implementation == "splash":
        out = _splash(q, k, v, valid, interpret=interpret, block=block)
    else:
        out = _cudnn(q, k, v, valid)
    return jnp.where(valid[:, :, None, None], out, jnp.zeros((), out.dtype))


# ------------------------------------------------------------------------------------------------ cuDNN
def _cudnn(q, k, v, valid):
    """Left padding -> right padding by a per-row rotation, cuDNN's padded causal kernel, rotation undone."""
    t = q.shape[1]
    pad = t - jnp.sum(valid, axis=1, dtype=jnp.int32)  # [B]: left padding is a prefix of length pad
    src = (jnp.arange(t)[None, :] + pad[:, None]) % t  # rotated[b, i] = x[b, (i + pad) % t]
    dst = (jnp.arange(t)[None, :] - pad[:, None]) % t
    take = lambda x, idx: jnp.take_along_axis(x, idx[:, :, None, None], axis=1)  # noqa: E731
    lengths = t - pad
    out = jax.nn.dot_product_attention(
        take(q, src),
        take(k, src),
        take(v, src),
        is_causal=True,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        implementation="cudnn",
    )
    return take(out, dst)


# ------------------------------------------------------------------------------------------------ splash
@functools.lru_cache(maxsize=32)
def _splash_kernel(group: int, length: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    mask = sa.MultiHeadMask([sa.CausalMask((length, length)) for _ in range(group)])
    sizes = sa.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return sa.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _splash_local(q, k, v, valid, *, interpret: bool, block: int | None):
    """One shard: q `[B, T, Nq, D]` -> per (row, kv head) an MQA splash call over its G query heads."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    b, t, nq, d = q.shape
    nkv = k.shape[2]
    g = nq // nkv
    if block is None:
        padded = -(-t // 128) * 128
        block = next(c for c in (512, 256, 128) if padded % c == 0)
    else:
        padded = -(-t // block) * block
    extra = padded - t
    # The kernel does not scale q; it takes heads before positions.
    qh = (q.astype(jnp.float32) * d**-0.5).astype(q.dtype).reshape(b, t, nkv, g, d).transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Nkv, T, D]
    seg = valid.astype(jnp.int32)
    if extra:  # padding positions at the end, in their own segment (id 2): valid queries never see them
        qh = jnp.pad(qh, ((0, 0), (0, 0), (0, 0), (0, extra), (0, 0)))
        kh, vh = (jnp.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0))) for x in (kh, vh))
        seg = jnp.pad(seg, ((0, 0), (0, extra)), constant_values=2)
    # Padding queries form segment 0 with the padding keys: every query row keeps at least itself, so the
    # kernel's softmax never sees an empty row (their outputs are zeroed by the caller).
    kernel = _splash_kernel(g, padded, block, interpret)
    per_head = jax.vmap(
        lambda qq, kk, vv, s: kernel(qq, kk, vv, segment_ids=SegmentIds(q=s, kv=s)), in_axes=(0, 0, 0, None)
    )
    out = jax.vmap(per_head)(qh, kh, vh, seg)  # [B, Nkv, G, T', D]
    return out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, nq, d).astype(q.dtype)


def _splash(q, k, v, valid, *, interpret: bool, block: int | None):
    local = functools.partial(_splash_local, interpret=interpret, block=block)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v, valid)
    # Batch rows over the data axes and kv heads (with their query groups) over tensor when they divide;
    # anything else replicated, by the same rule as every other placement.
    sizes = mesh_axis_sizes(mesh)
    b, _, nq, _ = q.shape
    nkv = k.shape[2]
    kv_spec = divisible_spec((b, 1, nkv, 1), (_BATCH_AXES, None, _HEAD_AXIS, None), sizes)
    batch, heads = kv_spec[0], kv_spec[2]
    spec = jax.sharding.PartitionSpec(batch, None, heads, None)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(spec, spec, spec, jax.sharding.PartitionSpec(batch, None)),
        out_specs=spec,
        check_vma=False,
    )(q, k, v, valid)
