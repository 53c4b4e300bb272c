"""Pure, jittable next-token sampling: temperature, top-k, top-p, greedy, and the log-probability
of the chosen token.

Why it is written this way:
- The returned log-probability is always `log_softmax(logits / T)` of the *full* distribution
  (`log_softmax(logits)` for greedy), never of the top-k / top-p renormalised one. That is the
  quantity the policy loss recomputes from a plain forward pass, so it can serve as the
  old-policy log-probability without the trainer knowing which filters the rollout used.
- Sampling uses the inverse CDF with one uniform per row instead of Gumbel-max: Gumbel noise needs
  a random number and two logarithms per vocabulary entry, which on CPU costs more than the whole
  decode step of a small model (`mtgrpo bench rollout` shows the step time). The CDF is searched in
  two levels (block sums, then one block). Without top-k / top-p the weights are never written out:
  the block sums (which also give the log-partition) are taken straight from the logits and only the
  chosen block's weights are computed again, so sampling is two passes over the logits (max, then
  exp and sums) plus small work.
- Top-p needs the tokens sorted by probability; a full vocabulary sort per step is very slow on
  XLA:CPU, so the top-p threshold is found exactly by bisection over the
  bit patterns of the (non-negative) float32 weights: 31 masked sums instead of a sort.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_CDF_BLOCK = 128  # block width of the two-level CDF search


def greedy(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Arg-max tokens (first index on ties, like `jnp.argmax`) and their `log_softmax(logits)`.

    The first maximal index is found with a min-reduction over indices, which XLA:CPU runs several
    times faster than its variadic arg-max reduction."""
    v = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    tokens = jnp.min(jnp.where(logits == top, iota, v), axis=-1).astype(jnp.int32)
    lse = top[..., 0] + jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1))
    return tokens, top[..., 0] - lse


def inverse_cdf(weights: jax.Array, u: jax.Array, block: int = _CDF_BLOCK) -> jax.Array:
    """Index drawn with probability proportional to `weights` ([R, V], >= 0, some > 0 per row),
    using `u` ([R], uniform in [0, 1)). Zero-weight entries are never returned, even when float
    rounding of the running sums would otherwise point past the last positive entry."""
    return _blocked_inverse_cdf(_blocks(weights, block, 0.0), u, lambda w: w)[0]


def _blocks(x: jax.Array, block: int, fill: float) -> jax.Array:
    """[R, V] -> [R, ceil(V / block), block], the tail padded with `fill`."""
    r, v = x.shape
    nb = -(-v // block)
    if nb * block != v:
        x = jnp.pad(x, ((0, 0), (0, nb * block - v)), constant_values=fill)
    return x.reshape(r, nb, block)


def _blocked_inverse_cdf(xb: jax.Array, u: jax.Array, weight) -> tuple[jax.Array, jax.Array]:
    """`inverse_cdf` over the weights `weight(xb)` (elementwise, >= 0; `xb` [R, nb, block]), and each
    row's total weight. The CDF is searched in two levels: block sums, then the chosen block, whose
    weights are computed again from its `xb` entries, so the [R, V] weights are never materialised."""
    r, nb, block = xb.shape
    block_sum = jnp.sum(weight(xb), axis=-1)  # [R, nb]
    block_cum = jnp.cumsum(block_sum, axis=-1)
    target = u * block_cum[:, -1]
    last_block = jnp.max(jnp.where(block_sum > 0, jnp.arange(nb, dtype=jnp.int32), 0), -1)
    b = jnp.minimum(jnp.sum(block_cum <= target[:, None], axis=-1).astype(jnp.int32), last_block)
    before = jnp.where(b > 0, jnp.take_along_axis(block_cum, jnp.maximum(b - 1, 0)[:, None], -1)[:, 0], 0.0)
    chosen = weight(jnp.take_along_axis(xb, b[:, None, None], axis=1))[:, 0]  # [R, block]
    inner_cum = jnp.cumsum(chosen, axis=-1)
    inner_iota = jnp.arange(block, dtype=jnp.int32)
    last_inner = jnp.max(jnp.where(chosen > 0, inner_iota, 0), -1)
    j = jnp.minimum(jnp.sum(inner_cum <= (target - before)[:, None], axis=-1).astype(jnp.int32), last_inner)
    return b * block + j, block_cum[:, -1]


def top_p_mask(weights: jax.Array, top_p: jax.Array) -> jax.Array:
    """Nucleus set of each row of non-negative `weights` [R, K] (unnormalised probabilities).

    Keeps the smallest set of most probable entries whose mass reaches `top_p` of the row's total:
    entry i is kept iff the mass of entries strictly more probable than it is < top_p. Entries tied
    with the last kept one are all kept. Found by bisection on the float32 bit pattern (monotone for
    non-negative floats): the largest threshold tau with mass(w >= tau) >= top_p * total is exactly
    the weight of the last kept entry, so the result equals the sort-and-cumsum definition."""
    total = jnp.sum(weights, axis=-1)
    target = jnp.asarray(top_p, jnp.float32) * total
    bits = jax.lax.bitcast_convert_type(weights, jnp.int32)
    lo = jnp.zeros(weights.shape[:1], jnp.int32)  # threshold 0.0: mass == total >= target
    hi = jnp.max(bits, axis=-1) + 1  # just above the max: mass 0 < target (top_p > 0)

    def bisect(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        mass = jnp.sum(jnp.where(bits >= mid[:, None], weights, 0.0), axis=-1)
        ok = mass >= target
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, bisect, (lo, hi))
    return bits >= lo[:, None]


def sample(
    logits: jax.Array,
    u: jax.Array,
    temperature,
    *,
    greedy_decode: bool = False,
    top_k: int = 0,
    top_p=1.0,
    use_top_p: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Draws one token per row of float32 `logits` [R, V] with uniforms `u` [R].

    Returns (tokens int32 [R], logprobs float32 [R]) where logprobs = log_softmax(logits / T) of the
    full distribution at the chosen token (see the module docstring). `greedy_decode`, `top_k` and
    `use_top_p` are static (they change the program); `temperature` and `top_p` may be traced.
    Filters apply in the order top-k, then top-p on the top-k-renormalised distribution (as in
    transformers and vLLM)."""
    logits = logits.astype(jnp.float32)
    if greedy_decode:
        return greedy(logits)
    scaled = logits / jnp.asarray(temperature, jnp.float32)
    top = jnp.max(scaled, axis=-1, keepdims=True)
    v = logits.shape[-1]
    if 0 < top_k < v or use_top_p:
        weights = jnp.exp(scaled - top)  # unnormalised softmax; reused for the log-partition
        log_z = top[:, 0] + jnp.log(jnp.sum(weights, axis=-1))
    if 0 < top_k < v:
        cand_logits, cand_idx = jax.lax.top_k(scaled, top_k)  # sorted descending
        cand_w = jnp.exp(cand_logits - top)
        if use_top_p:
            cand_w = jnp.where(top_p_mask(cand_w, top_p), cand_w, 0.0)
        pick = inverse_cdf(cand_w, u)
        tokens = jnp.take_along_axis(cand_idx, pick[:, None], axis=-1)[:, 0]
    elif use_top_p:
        tokens = inverse_cdf(jnp.where(top_p_mask(weights, top_p), weights, 0.0), u)
    else:
        # The full distribution: the block sums come straight from the logits and also give the
        # log-partition, so the step makes two passes over [R, V] (max, then exp and sums) and writes none.
        tokens, total = _blocked_inverse_cdf(
            _blocks(scaled, _CDF_BLOCK, -jnp.inf), u, lambda x: jnp.exp(x - top[:, :, None])
        )
        log_z = top[:, 0] + jnp.log(total)
    tokens = tokens.astype(jnp.int32)
    chosen = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen - log_z


def kept_tokens(logits: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Bool [R, V]: the support `sample` draws from for these settings (for tests and inspection)."""
    scaled = logits.astype(jnp.float32) / temperature
    v = logits.shape[-1]
    keep = jnp.ones(scaled.shape, bool)
    weights = jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True))
    if 0 < top_k < v:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
        keep = scaled >= kth
        weights = jnp.where(keep, weights, 0.0)
    if top_p < 1.0:
        keep = keep & top_p_mask(weights, top_p)
    return keep
