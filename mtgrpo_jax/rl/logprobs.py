"""Token log-probabilities (and entropies) from logits, in float32.

The plain path writes ``log_softmax`` over the whole ``[..., V]`` logits upcast to float32, and XLA
normally fuses that upcast into the reductions. The chunked path (``chunk_size``) walks the vocabulary
in slices with an online log-sum-exp, upcasting one slice at a time and rematerialising it in the
backward pass, so it does not rely on fusion to keep float32 copies of the logits out of memory.
Measured on CPU (jax 0.10.2, logits [4, 256, 32768], XLA temp buffers, forward / backward):
float32 logits, plain 0 / 0 MiB (256 MiB backward with entropy), chunk 4096: 16-32 / 48 MiB;
bfloat16 logits (the CPU backend upcasts bf16 wholesale), plain 128 / 256-512 MiB, chunked 144-160 /
288-304 MiB. So it is no default: reach for it when a profile on the accelerator shows the plain path
materialising float32 copies of the logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(logits, tokens, temperature, chunk_size):
    if jnp.ndim(logits) < 1 or jnp.shape(tokens) != jnp.shape(logits)[:-1]:
        raise ValueError(f"tokens must have the shape of logits without its vocab axis: "
                         f"logits {jnp.shape(logits)}, tokens {jnp.shape(tokens)}")
    if not jnp.issubdtype(jnp.asarray(tokens).dtype, jnp.integer):
        raise ValueError(f"tokens must be integer ids, got dtype {jnp.asarray(tokens).dtype}")
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int or None")


def _lse_stats(x):
    """Per-row (max, sum exp(x - max), sum exp(x - max) * x) of a float32 slice [..., c]."""
    # The shift is a constant as far as the math goes, so it carries no gradient (as in logsumexp).
    mx = jax.lax.stop_gradient(jnp.max(x, axis=-1))
    e = jnp.exp(x - mx[..., None])
    return mx, jnp.sum(e, axis=-1), jnp.sum(e * x, axis=-1)


def _merge(a, b):
    (ma, sa, ta), (mb, sb, tb) = a, b
    m = jax.lax.stop_gradient(jnp.maximum(ma, mb))
    fa, fb = jnp.exp(ma - m), jnp.exp(mb - m)
    return m, sa * fa + sb * fb, ta * fa + tb * fb


def token_logprobs_from_logits(logits, tokens, temperature: float = 1.0, *, chunk_size: int | None = None,
                               return_entropy: bool = False):
    """log softmax(logits / temperature)[tokens] as float32 (float64 if the logits are), shape of tokens.

    ``temperature`` must match the one used to sample, or the importance ratios are biased. With
    ``return_entropy=True`` also returns the entropy of softmax(logits / temperature) per position.
    ``chunk_size`` (e.g. 8192) switches to the vocab-chunked online path; results agree with the
    plain path to float32 rounding.
    """
    _check(logits, tokens, temperature, chunk_size)
    logits = jnp.asarray(logits)
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    tokens = jnp.asarray(tokens)
    target = jnp.take_along_axis(logits, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    target = target.astype(dtype) / temperature

    vocab = logits.shape[-1]
    if chunk_size is None or chunk_size >= vocab:
        x = logits.astype(dtype) / temperature
        lse = jax.nn.logsumexp(x, axis=-1)
        logp = target - lse
        if not return_entropy:
            return logp
        p = jnp.exp(x - lse[..., None])
        return logp, lse - jnp.sum(p * x, axis=-1)

    n_full = vocab // chunk_size

    def stats_of(width):
        # Rematerialised in the backward pass: the float32 slice is recomputed, never stored per step.
        @jax.checkpoint
        def stats(start):
            piece = jax.lax.dynamic_slice_in_dim(logits, start, width, axis=-1)
            return _lse_stats(piece.astype(dtype) / temperature)
        return stats

    full_chunk = stats_of(chunk_size)
    # The first slice seeds the carry, so the running max is finite before any exp(m_old - m_new).
    carry = full_chunk(0)
    carry, _ = jax.lax.scan(lambda c, i: (_merge(c, full_chunk(i * chunk_size)), None), carry,
                            jnp.arange(1, n_full))
    if vocab % chunk_size:
        carry = _merge(carry, stats_of(vocab % chunk_size)(n_full * chunk_size))
    mx, s, t = carry
    lse = mx + jnp.log(s)
    logp = target - lse
    if not return_entropy:
        return logp
    return logp, lse - t / s
