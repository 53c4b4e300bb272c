"""Next-token sampling math (`mtgrpo_jax.rollout.sampling`) against NumPy references.

Significance: every chi-square test below rejects at alpha = 0.001. Seeds are fixed, so the tests
are deterministic; each also runs a negative control (a slightly wrong distribution) that the same
test must reject, so a pass is evidence of power, not of a blind test."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mtgrpo_jax.rollout import sampling

ALPHA = 1e-3


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _nucleus_reference(probs, top_p):
    """Sort-and-cumsum definition: keep entry i iff the mass strictly before it (descending) < top_p."""
    keep = np.zeros(probs.shape, bool)
    for r, p in enumerate(probs):
        order = np.argsort(-p, kind="stable")
        before = np.concatenate([[0.0], np.cumsum(p[order])[:-1]])
        keep[r, order[before < top_p]] = True
    return keep


def _chisquare_p(counts, probs):
    """p-value of observed counts against probs, pooling small-expectation bins (expected >= 5)."""
    n = counts.sum()
    expected = probs * n
    order = np.argsort(expected)
    obs_bins, exp_bins, acc_o, acc_e = [], [], 0.0, 0.0
    for i in order:
        acc_o += counts[i]
        acc_e += expected[i]
        if acc_e >= 5:
            obs_bins.append(acc_o)
            exp_bins.append(acc_e)
            acc_o = acc_e = 0.0
    if acc_e > 0:
        obs_bins[-1] += acc_o
        exp_bins[-1] += acc_e
    return stats.chisquare(obs_bins, exp_bins).pvalue


def _draw(logits_row, num, temperature, top_k=0, top_p=1.0, seed=0):
    logits = jnp.broadcast_to(jnp.asarray(logits_row, jnp.float32), (num, len(logits_row)))
    u = jax.random.uniform(jax.random.key(seed), (num,))
    fn = jax.jit(lambda lg, u: sampling.sample(lg, u, temperature, top_k=top_k, top_p=top_p, use_top_p=top_p < 1.0))
    tokens, logprobs = fn(logits, u)
    return np.asarray(tokens), np.asarray(logprobs)


def test_temperature_frequencies_match_softmax_chi_square():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2.0, size=300).astype(np.float32)  # 300 > one CDF block: both levels are used
    temperature = 0.7
    tokens, logprobs = _draw(logits, 40_000, temperature)
    counts = np.bincount(tokens, minlength=len(logits))
    probs = _softmax(logits.astype(np.float64) / temperature)
    assert _chisquare_p(counts, probs) > ALPHA
    # negative control: the same samples against the softmax at a wrong temperature are rejected
    assert _chisquare_p(counts, _softmax(logits.astype(np.float64) / 0.8)) < ALPHA
    # the returned logprob is log_softmax(logits / T) at the sampled token
    np.testing.assert_allclose(logprobs, np.log(probs)[tokens], atol=1e-5)


def test_top_p_mask_equals_sort_cumsum_definition():
    rng = np.random.default_rng(1)
    for top_p in (0.05, 0.3, 0.5, 0.9, 0.99):
        logits = rng.normal(0, 3.0, size=(64, 200))
        probs = _softmax(logits)
        got = np.asarray(sampling.top_p_mask(jnp.asarray(probs * 7.0, jnp.float32), top_p))  # unnormalised input
        np.testing.assert_array_equal(got, _nucleus_reference(probs, top_p), err_msg=f"top_p={top_p}")


def test_top_p_keeps_exactly_the_nucleus():
    # probabilities 0.4, 0.25, 0.15, 0.1, 0.06, 0.04: top_p 0.75 keeps {0, 1, 2} (0.4+0.25 < 0.75 <= 0.8)
    probs = np.array([0.25, 0.04, 0.4, 0.1, 0.15, 0.06])
    logits = np.log(probs)
    tokens, logprobs = _draw(logits, 20_000, 1.0, top_p=0.75, seed=3)
    assert set(np.unique(tokens)) == {0, 2, 4}
    kept = np.array([0, 2, 4])
    counts = np.bincount(tokens, minlength=6)[kept]
    assert _chisquare_p(counts, probs[kept] / probs[kept].sum()) > ALPHA
    # logprobs are those of the full (unfiltered) distribution
    np.testing.assert_allclose(logprobs, logits[tokens], atol=1e-5)
    assert np.asarray(sampling.kept_tokens(jnp.asarray(logits[None], jnp.float32), 1.0, top_p=0.75))[0].tolist() == [
        True,
        False,
        True,
        False,
        True,
        False,
    ]


def test_top_k_keeps_exactly_k_most_likely_then_top_p():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 1.5, size=50).astype(np.float32)
    temperature = 1.3
    top5 = set(np.argsort(-logits)[:5].tolist())
    tokens, _ = _draw(logits, 20_000, temperature, top_k=5, seed=4)
    assert set(np.unique(tokens).tolist()) == top5
    kept = np.array(sorted(top5))
    probs = _softmax(logits[kept].astype(np.float64) / temperature)
    assert _chisquare_p(np.bincount(tokens, minlength=50)[kept], probs) > ALPHA
    # top-k then top-p: the nucleus of the renormalised top-5
    renorm = np.zeros(50)
    renorm[kept] = probs
    expect = set(np.flatnonzero(_nucleus_reference(renorm[None], 0.6)[0]).tolist())
    tokens, _ = _draw(logits, 20_000, temperature, top_k=5, top_p=0.6, seed=5)
    assert set(np.unique(tokens).tolist()) == expect and len(expect) < 5
    keep = np.asarray(sampling.kept_tokens(jnp.asarray(logits[None]), temperature, top_k=5, top_p=0.6))[0]
    assert set(np.flatnonzero(keep).tolist()) == expect


def test_greedy_is_first_argmax_with_log_softmax():
    logits = jnp.asarray([[0.0, 3.0, 3.0, -1.0], [5.0, 1.0, 2.0, 5.0 - 1e-3]], jnp.float32)
    tokens, logprobs = sampling.greedy(logits)
    assert tokens.tolist() == [1, 0]
    np.testing.assert_allclose(logprobs, jax.nn.log_softmax(logits)[jnp.arange(2), tokens], atol=1e-6)


@pytest.mark.parametrize("v", [7, 128, 300])
def test_inverse_cdf_never_returns_zero_weight(v):
    rng = np.random.default_rng(v)
    weights = rng.random((256, v)).astype(np.float32)
    weights[weights < 0.8] = 0.0
    weights[:, -1] = 0.0  # a zero tail: rounding at u -> 1 must not select it
    weights[weights.sum(1) == 0, 0] = 1.0
    u = np.concatenate([np.full(128, np.nextafter(np.float32(1), np.float32(0))), rng.random(128)]).astype(np.float32)
    idx = np.asarray(sampling.inverse_cdf(jnp.asarray(weights), jnp.asarray(u)))
    assert (weights[np.arange(256), idx] > 0).all()


@pytest.mark.parametrize("v", [7, 300, 32000])
def test_full_distribution_draw_is_the_inverse_cdf_at_u(v):
    """Without top-k / top-p, `sample` never materialises the weights (block sums straight from the
    logits, a vocabulary padded with -inf). The token it returns must still be the inverse CDF of
    softmax(logits / T) at u (to float32 rounding of the running sums), never a zero-weight entry (u -> 1
    and logits whose weight underflows to 0 included), with log_softmax's log-probability."""
    rng = np.random.default_rng(v)
    logits = (rng.normal(size=(64, v)) * 4).astype(np.float32)
    logits[:8, : v // 2] = -200.0  # weight exp(-200 - max) underflows to 0
    u = np.concatenate([np.full(8, np.nextafter(np.float32(1), np.float32(0))), rng.random(56)]).astype(np.float32)
    for temperature in (1.0, 0.7):
        tokens, logprobs = jax.jit(lambda lg, u, t=temperature: sampling.sample(lg, u, t))(logits, u)
        tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
        scaled = logits.astype(np.float64) / np.float32(temperature)
        probs = _softmax(scaled)
        rows = np.arange(64)
        cdf_hi = np.cumsum(probs, axis=-1)[rows, tokens]
        assert (probs[rows, tokens] > 1e-30).all()
        assert (cdf_hi - probs[rows, tokens] - 1e-5 <= u).all() and (u <= cdf_hi + 1e-5).all()
        log_softmax = scaled - scaled.max(-1, keepdims=True)
        log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
        np.testing.assert_allclose(logprobs, log_softmax[rows, tokens], rtol=1e-5, atol=1e-5)
