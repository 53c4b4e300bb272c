"""Token log-probabilities (and entropies) in float32, from logits or straight from hidden states.

`token_logprobs_from_logits` takes `[..., V]` logits; its ``chunk_size`` walks the vocabulary in slices
with an online log-sum-exp, rematerialising each slice in the backward pass.

`token_logprobs_from_hidden` is what the training programs use at scale: it takes the final hidden states
and the LM head matrix and chunks the head matmul itself, over positions and over the vocabulary, each
chunk under `jax.checkpoint`, so float32 `[rows, T, V]` logits never exist (at a 152k vocabulary they
are 2.5 GB a row at 4k tokens). Both agree with the plain computation to float32 rounding. The chunk
loops are `mtgrpo_jax.loops.scan`, so `mtgrpo plan` can unroll them to count every chunk's cost.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtgrpo_jax import loops


def _check(logits, tokens, temperature, chunk_size):
    if jnp.ndim(logits) < 1 or jnp.shape(tokens) != jnp.shape(logits)[:-1]:
        raise ValueError(
            f"tokens must have the shape of logits without its vocab axis: "
            f"logits {jnp.shape(logits)}, tokens {jnp.shape(tokens)}"
        )
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


def token_logprobs_from_logits(
    logits, tokens, temperature: float = 1.0, *, chunk_size: int | None = None, return_entropy: bool = False
):
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
    carry, _ = loops.scan(lambda c, i: (_merge(c, full_chunk(i * chunk_size)), None), carry, jnp.arange(1, n_full))
    if vocab % chunk_size:
        carry = _merge(carry, stats_of(vocab % chunk_size)(n_full * chunk_size))
    mx, s, t = carry
    lse = mx + jnp.log(s)
    logp = target - lse
    if not return_entropy:
        return logp
    return logp, lse - t / s


def _head_stats(h, head, tokens, temperature, vocab_chunk: int):
    """(max, sum exp, sum exp * x, target logit) of x = h @ head / temperature over the vocabulary, for one
    block of positions h [..., c, H]; the vocabulary is walked in `vocab_chunk` slices (0: in one piece),
    each slice's float32 logits recomputed in the backward pass instead of stored."""
    vocab = head.shape[-1]
    width = vocab if vocab_chunk <= 0 or vocab_chunk >= vocab else vocab_chunk

    def piece(start, size):
        @jax.checkpoint
        def stats(start):
            w = jax.lax.dynamic_slice_in_dim(head, start, size, axis=-1)
            x = jnp.einsum("...h,hv->...v", h, w, preferred_element_type=jnp.float32) / temperature
            mx, s, t = _lse_stats(x)
            # The target logit, picked from the slice that holds it (so it is the same number as the lse's).
            local = tokens - start
            hit = (local >= 0) & (local < size)
            pick = jnp.take_along_axis(x, jnp.clip(local, 0, size - 1)[..., None], axis=-1)[..., 0]
            return (mx, s, t), jnp.where(hit, pick, 0.0)

        return stats(start)

    n_full = vocab // width
    carry, target = piece(0, width)
    if n_full > 1:

        def body(c, i):
            stats, tgt = piece(i * width, width)
            return (_merge(c[0], stats), c[1] + tgt), None

        (carry, target), _ = loops.scan(body, (carry, target), jnp.arange(1, n_full))
    if vocab % width:
        stats, tgt = piece(n_full * width, vocab % width)
        carry, target = _merge(carry, stats), target + tgt
    return carry, target


def token_logprobs_from_hidden(
    hidden,
    head,
    tokens,
    temperature: float = 1.0,
    *,
    seq_chunk: int = 0,
    vocab_chunk: int = 0,
    return_entropy: bool = False,
):
    """log softmax(hidden @ head / temperature)[tokens] in float32 without holding `[rows, T, V]` logits.

    hidden `[N, T, H]` (the model's final-norm hidden states at the positions that predict `tokens`),
    head `[H, V]` (the LM head as a matrix, activation dtype), tokens int `[N, T]`. The positions are cut
    into blocks of `seq_chunk` (0: all T at once) and the vocabulary into slices of `vocab_chunk` (0:
    whole); neither needs to divide its axis. Each block's logits exist only inside its own
    `jax.checkpoint`: the forward keeps three float32 numbers per position and the backward recomputes
    the logits of one block (and one slice) at a time. Values and gradients equal the full computation
    to float32 rounding. With `return_entropy=True` also returns the per-position entropy.
    """
    hidden, tokens = jnp.asarray(hidden), jnp.asarray(tokens)
    if hidden.ndim != 3 or tokens.shape != hidden.shape[:2] or head.ndim != 2 or head.shape[0] != hidden.shape[2]:
        raise ValueError(
            f"expected hidden [N, T, H], head [H, V], tokens [N, T]: got hidden {hidden.shape}, "
            f"head {jnp.shape(head)}, tokens {tokens.shape}"
        )
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    for name, value in (("seq_chunk", seq_chunk), ("vocab_chunk", vocab_chunk)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r} must be an int >= 0 (0: no chunking)")
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    tokens = tokens.astype(jnp.int32)
    n, t, _ = hidden.shape

    def block(h, tok):
        (mx, s, tsum), target = _head_stats(h, head, tok, temperature, vocab_chunk)
        lse = mx + jnp.log(s)
        return target - lse, lse - tsum / s

    if seq_chunk <= 0 or seq_chunk >= t:
        logp, entropy = block(hidden, tokens)
    else:
        blocks = -(-t // seq_chunk)
        pad = blocks * seq_chunk - t  # a padded tail block: zero hidden states, token 0, sliced off below
        h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(n, blocks, seq_chunk, -1).swapaxes(0, 1)
        tok = jnp.pad(tokens, ((0, 0), (0, pad))).reshape(n, blocks, seq_chunk).swapaxes(0, 1)
        one = jax.checkpoint(block)
        _, (logp, entropy) = loops.scan(lambda c, xs: (c, one(*xs)), None, (h, tok))
        logp = logp.swapaxes(0, 1).reshape(n, -1)[:, :t]
        entropy = entropy.swapaxes(0, 1).reshape(n, -1)[:, :t]
    return (logp, entropy) if return_entropy else logp
