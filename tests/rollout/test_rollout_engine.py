"""The rollout engine end to end on tiny real `Transformer`s of every family (float32 for parity).

Chi-square tests reject at alpha = 0.001 (fixed seeds: deterministic)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from mtgrpo_jax.models import ModelConfig, Transformer, decode
from mtgrpo_jax.rollout import Buckets, RolloutEngine, SamplingParams, to_serve_layout

ALPHA = 1e-3
BASE = dict(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    eos_token_id=None,
)
FAMILIES = {
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, attention_bias=True),
    "qwen3": dict(model_type="qwen3", head_dim=16, qk_norm=True, attention_bias=False, tie_word_embeddings=True),
    "llama": dict(
        model_type="llama",
        attention_bias=False,
        tie_word_embeddings=False,
        num_key_value_heads=1,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
}
BUCKETS = Buckets(prompt_lengths=(8, 16), batch_sizes=(2, 4))
PROMPTS = [[5, 9, 2], [7, 1, 4, 4, 8, 3, 2, 6, 11], [13]]


def make_model(family: str, seed: int = 0) -> Transformer:
    """A tiny float32 model with every parameter redrawn at a larger scale, so that logits are peaked
    and greedy paths are not the random-init "repeat the last token" degenerate case."""
    cfg = ModelConfig(**{**BASE, **FAMILIES[family]})
    model = Transformer(cfg, rngs=nnx.Rngs(seed), dtype=jnp.float32, param_dtype=jnp.float32)
    params = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(seed + 100)  # NumPy: no XLA compilation per parameter shape
    flat = jax.tree_util.tree_flatten_with_path(params)
    new = [
        jnp.asarray(
            1.0 + 0.2 * rng.standard_normal(x.shape) if "norm" in str(path) else 0.35 * rng.standard_normal(x.shape),
            jnp.float32,
        )
        for path, x in flat[0]
    ]
    nnx.update(model, jax.tree.unflatten(flat[1], new))
    return model


@pytest.fixture(scope="module")
def models():
    return {f: make_model(f) for f in FAMILIES}


@pytest.fixture(scope="module")
def engines(models):
    """One engine per family shared by the tests below, so that tests using the same shapes and
    sampling mode reuse one compiled program (XLA:CPU compiles take seconds)."""
    return {f: RolloutEngine(m, None, BUCKETS) for f, m in models.items()}


M = 8
GREEDY = SamplingParams(n=1, temperature=0.0, max_new_tokens=M)
SAMPLE = SamplingParams(n=2, temperature=1.0, max_new_tokens=M)


_REF_LEN = 32  # reference sequences are right-padded to one length: one compiled forward per model
_forwards = {}


def full_forward_log_softmax(model, seq, temperature=1.0):
    """float64 log_softmax(logits / T) of the full no-cache forward over `seq` (a token list), at every
    position of `seq` (right padding cannot affect earlier positions under the causal mask)."""
    if id(model) not in _forwards:
        graphdef, state = nnx.split(model)
        _forwards[id(model)] = (jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids)), state)
    fn, state = _forwards[id(model)]
    ids = np.zeros((1, _REF_LEN), np.int32)
    ids[0, : len(seq)] = seq
    logits = np.asarray(fn(state, jnp.asarray(ids))[0, : len(seq)], np.float64) / temperature
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def reference_greedy(model, prompt, steps):
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(np.argmax(full_forward_log_softmax(model, seq)[-1])))
    return seq[len(prompt) :]


@pytest.mark.parametrize("family,impl", [("qwen2", "fast"), ("qwen3", "fast"), ("llama", "fast"), ("qwen2", "model")])
def test_greedy_matches_stepwise_argmax_and_logprobs(models, engines, family, impl):
    model = models[family]
    engine = engines[family] if impl == "fast" else RolloutEngine(model, None, BUCKETS, decode_impl=impl)
    assert engine.decode_impl == impl
    m = M
    out = engine.generate(PROMPTS, GREEDY)
    assert out.tokens.shape == (3, m) and out.tokens.dtype == np.int32 and out.mask.all()
    assert out.finish_reason == ["length"] * 3
    seen = set()
    for i, prompt in enumerate(PROMPTS):
        expect = reference_greedy(model, prompt, m)
        assert out.tokens[i].tolist() == expect, (family, i)
        logp = full_forward_log_softmax(model, prompt + expect)[len(prompt) - 1 : -1]
        np.testing.assert_allclose(out.logprobs[i], logp[np.arange(m), expect], atol=1e-4, rtol=0)
        seen.update(expect)
    assert len(seen) >= 5  # non-degenerate paths (not the random-init "repeat the last token" case)


@pytest.mark.parametrize("block,max_phases", [(5, 2), (3, 8), (None, 4)])
def test_blocked_cache_and_phased_decode_match_stepwise_argmax(models, block, max_phases):
    """Cache blocks that do not divide the prompt bucket or the cache, several blocks per phase
    (masked writes) and one block per phase all give the reference greedy path and logprobs."""
    model = models["qwen3"]
    engine = RolloutEngine(model, None, BUCKETS, attention_block=block, max_phases=max_phases)
    assert engine.attention_block == block
    m = 12
    phases = engine._phases(m)
    assert len(phases) == (1 if block is None else max_phases if block == 5 else 4)
    out = engine.generate(PROMPTS, dataclasses.replace(GREEDY, max_new_tokens=m))
    for i, prompt in enumerate(PROMPTS):
        expect = reference_greedy(model, prompt, m)
        assert out.tokens[i].tolist() == expect, (block, i)
        logp = full_forward_log_softmax(model, prompt + expect)[len(prompt) - 1 : -1]
        np.testing.assert_allclose(out.logprobs[i], logp[np.arange(m), expect], atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "m,block,max_phases",
    [
        (12, 5, 2),
        (1, 4, 4),
        (2, 4, 4),
        (128, 32, 4),
        (128, 64, 4),
        (128, 32, 3),
        (1024, 64, 4),
        (30, 64, 4),
        (9, 3, 100),
    ],
)
def test_decode_phases_cover_every_step_once_in_order(models, m, block, max_phases):
    """Every decode step t in [0, m - 1) runs in exactly one phase, phases run in order, and the
    generated slot t a step writes lies in the blocks its phase may write and read."""
    engine = RolloutEngine(models["qwen2"], None, BUCKETS, attention_block=block, max_phases=max_phases)
    phases = engine._phases(m)
    assert 1 <= len(phases) <= max_phases
    starts = np.concatenate([[0], np.cumsum(decode.block_sizes(m, block))])
    t, seen = 0, []
    for t_end, (first, blocks) in phases:
        while t + 1 < m and t < t_end:
            assert starts[first] <= t < starts[blocks], (t, first, blocks)
            seen.append(t)
            t += 1
    assert seen == list(range(m - 1))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sampled_logprobs_equal_full_forward_log_softmax_at_temperature(models, engines, family):
    model, engine = models[family], engines[family]
    temperature = 0.8
    out = engine.generate(
        PROMPTS, SamplingParams(n=2, temperature=temperature, top_k=20, top_p=0.9, max_new_tokens=8), jax.random.key(1)
    )
    assert out.tokens.shape == (6, 8) and out.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    for r in range(6):
        prompt = PROMPTS[out.prompt_index[r]]
        logp = full_forward_log_softmax(model, prompt + out.tokens[r].tolist(), temperature)[len(prompt) - 1 : -1]
        np.testing.assert_allclose(out.logprobs[r], logp[np.arange(8), out.tokens[r]], atol=1e-4, rtol=0)
        # every sampled token is inside its step's top-k (top-p is checked exactly in the unit tests)
        ranks = (logp > logp[np.arange(8), out.tokens[r]][:, None]).sum(-1)
        assert (ranks < 20).all()


def test_first_token_frequencies_match_softmax_chi_square(models):
    model = models["qwen2"]
    prompt, temperature, n = [3, 14, 15], 1.5, 4096
    engine = RolloutEngine(model, None, Buckets(prompt_lengths=(8,), batch_sizes=(1,)))
    out = engine.generate([prompt], SamplingParams(n=n, temperature=temperature, max_new_tokens=1), jax.random.key(7))
    counts = np.bincount(out.tokens[:, 0], minlength=model.config.vocab_size)
    logits = full_forward_log_softmax(model, prompt)[-1]

    def p_value(t):
        probs = np.exp((logits - logits.max()) / t)
        probs /= probs.sum()
        expected = probs * n
        big = expected >= 5
        obs = np.append(counts[big], counts[~big].sum())
        exp = np.append(expected[big], expected[~big].sum())
        return stats.chisquare(obs, exp).pvalue

    assert p_value(temperature) > ALPHA
    assert p_value(temperature * 1.15) < ALPHA  # negative control: a 15 % wrong temperature is detected


def test_finished_rows_stay_finished_and_other_rows_are_unaffected(engines):
    engine = engines["qwen3"]
    free = engine.generate(PROMPTS, SAMPLE, jax.random.key(5))
    compiles = engine.num_compiles
    stops = tuple(range(0, 61, 12))  # a twelfth of the vocabulary stops a row
    out = engine.generate(PROMPTS, dataclasses.replace(SAMPLE, stop_token_ids=stops), jax.random.key(5))
    assert engine.num_compiles == compiles  # the stop list is data, not part of the program
    saw_stop = saw_length = False
    for r in range(6):
        hits = np.flatnonzero(np.isin(free.tokens[r], stops))
        expect_len = hits[0] + 1 if len(hits) else M
        assert out.lengths[r] == expect_len
        # the row is the free-running row up to and including its stop token ...
        assert out.tokens[r, :expect_len].tolist() == free.tokens[r, :expect_len].tolist()
        np.testing.assert_allclose(out.logprobs[r, :expect_len], free.logprobs[r, :expect_len], atol=1e-6)
        # ... and masked, padded and zero afterwards
        assert out.mask[r].tolist() == [True] * expect_len + [False] * (M - expect_len)
        assert (out.tokens[r, expect_len:] == engine.pad_token_id).all()
        assert (out.logprobs[r, expect_len:] == 0).all()
        reason = "stop" if len(hits) else "length"
        assert out.finish_reason[r] == reason
        saw_stop |= reason == "stop"
        saw_length |= reason == "length"
    assert saw_stop and saw_length


def test_loop_stops_as_soon_as_every_row_stopped(engines):
    engine = engines["qwen2"]
    m = M
    free = engine.generate(PROMPTS, GREEDY)
    assert free.num_decode_steps == m - 1
    # stop on every token the greedy rows produce at position 3: each row stops at or before index 3
    stops = tuple(sorted(set(free.tokens[:, 3].tolist())))
    out = engine.generate(PROMPTS, dataclasses.replace(GREEDY, stop_token_ids=stops))
    first = [int(np.flatnonzero(np.isin(row, stops))[0]) for row in free.tokens]
    assert out.lengths.tolist() == [f + 1 for f in first]
    assert out.num_decode_steps == max(first) < m - 1  # token t needs t forward passes after prefill
    assert out.finish_reason == ["stop"] * 3
    every = engine.generate(PROMPTS, dataclasses.replace(GREEDY, stop_token_ids=tuple(range(61))))
    assert every.num_decode_steps == 0 and every.lengths.tolist() == [1, 1, 1]


def test_n_samples_differ_and_are_reproducible_from_the_key(engines):
    engine = engines["qwen3"]
    a = engine.generate(PROMPTS, SAMPLE, jax.random.key(11))
    b = engine.generate(PROMPTS, SAMPLE, jax.random.key(11))
    c = engine.generate(PROMPTS, SAMPLE, jax.random.key(12))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert not np.array_equal(a.tokens, c.tokens)
    for i in range(3):
        assert a.tokens[2 * i].tolist() != a.tokens[2 * i + 1].tolist(), f"prompt {i}'s two samples are equal"


def test_twenty_varied_calls_compile_at_most_one_program_per_bucket(models):
    engine = RolloutEngine(models["qwen2"], None, BUCKETS)  # 2 prompt x 2 batch buckets
    rng = np.random.default_rng(0)
    seen = set()
    for call in range(20):
        batch = int(rng.integers(1, 5))
        prompts = [rng.integers(0, 61, size=int(rng.integers(1, 17))).tolist() for _ in range(batch)]
        out = engine.generate(prompts, SAMPLE, jax.random.key(call))
        assert out.tokens.shape == (batch * 2, M)
        seen.add((out.prompt_ids.shape[1], 2 if batch <= 2 else 4))
    assert engine.num_compiles == len(seen) <= BUCKETS.count == 4


def test_requests_above_the_largest_batch_bucket_run_in_chunks(engines):
    engine = engines["qwen2"]
    prompts = PROMPTS * 3  # 9 prompts, largest batch bucket 4: chunks of 4, 4 and 1
    out = engine.generate(prompts, SAMPLE, jax.random.key(3))
    assert out.tokens.shape == (18, M) and out.prompt_ids.shape == (9, 16)
    # a row's randomness depends on (key, row number) only, not on chunking or the batch bucket
    first = engine.generate(PROMPTS, SAMPLE, jax.random.key(3))
    np.testing.assert_array_equal(out.tokens[:6], first.tokens)
    last = engine.generate(prompts, SAMPLE, jax.random.key(3))
    np.testing.assert_array_equal(out.tokens, last.tokens)


def test_prompt_info_for_the_trainer(engines):
    out = engines["qwen2"].generate(PROMPTS, SAMPLE, jax.random.key(0))
    assert out.prompt_ids.shape == (3, 16) and out.prompt_lengths.tolist() == [3, 9, 1]
    for i, p in enumerate(PROMPTS):
        assert out.prompt_ids[i][out.prompt_mask[i]].tolist() == p
        assert not out.prompt_mask[i, : 16 - len(p)].any()  # left padded
    assert out.n == 2 and out.logprobs.dtype == np.float32 and out.mask.dtype == bool


def test_bad_inputs_raise_clear_errors(models):
    engine = RolloutEngine(models["qwen2"], None, BUCKETS)
    with pytest.raises(ValueError, match="stop token id 99 is outside"):
        engine.generate([[1]], SamplingParams(temperature=0.0, stop_token_ids=(99,)))
    ok = SamplingParams(n=1, temperature=0.0, max_new_tokens=2)
    with pytest.raises(ValueError, match="empty prompt list"):
        engine.generate([], ok)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], ok)
    with pytest.raises(ValueError, match=r"prompt 0 has 17 tokens, more than the largest prompt bucket \(16\)"):
        engine.generate([list(range(17))], ok)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([[1, 61]], ok)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        SamplingParams(n=-2)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        engine.generate([[1]], SamplingParams(temperature=1.0, max_new_tokens=2))
    with pytest.raises(ValueError, match="decode_impl"):
        RolloutEngine(models["qwen2"], None, BUCKETS, decode_impl="nope")
    with pytest.raises(ValueError, match="attention_block must be a positive integer"):
        RolloutEngine(models["qwen2"], None, BUCKETS, attention_block=0)
    with pytest.raises(ValueError, match="max_phases must be a positive integer"):
        RolloutEngine(models["qwen2"], None, BUCKETS, max_phases=0)
    assert engine.num_compiles == 0


def test_truncation_when_configured_is_counted(models):
    engine = RolloutEngine(models["qwen2"], None, BUCKETS, truncate_prompts=True)
    long = list(range(1, 21))  # 20 tokens, largest bucket 16: keeps the last 16
    out = engine.generate([long, [1, 2]], GREEDY)
    assert out.num_truncated == 1 and engine.num_truncated_prompts == 1
    assert out.prompt_ids[0].tolist() == long[-16:]
    same = engine.generate([long[-16:], [1, 2]], GREEDY)
    np.testing.assert_array_equal(out.tokens, same.tokens)
    assert same.num_truncated == 0 and engine.num_truncated_prompts == 1


def test_the_decode_cache_is_reused_and_donated(engines):
    engine = engines["qwen3"]
    engine.generate(PROMPTS, SAMPLE, jax.random.key(0))
    held = engine._cache[1]
    first_leaf = jax.tree.leaves(held)[0]
    engine.generate(PROMPTS, SAMPLE, jax.random.key(1))
    assert first_leaf.is_deleted()  # donated to the program, not copied
    assert jax.tree.leaves(engine._cache[1])[0].shape == first_leaf.shape


def test_mesh_engine_matches_single_device_and_reports_reshard_cost(engines):
    from mtgrpo_jax.parallel import make_mesh, shard_model

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    model = make_model("qwen2")  # same weights as engines["qwen2"]'s model, but its own copy to reshard
    params = SAMPLE
    single = engines["qwen2"].generate(PROMPTS, params, jax.random.key(9))
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    shard_model(model, mesh, "train")  # the trainer's FSDP layout
    engine = RolloutEngine(model, None, Buckets(prompt_lengths=(8, 16), batch_sizes=(4,)), mesh=mesh)
    out = engine.generate(PROMPTS, params, jax.random.key(9))
    np.testing.assert_array_equal(out.tokens, single.tokens)
    np.testing.assert_allclose(out.logprobs, single.logprobs, atol=1e-4)
    assert engine.last_reshard_seconds > 0
    served, seconds = to_serve_layout(nnx.state(model), mesh)
    q = served["layers"]["q_proj"]
    assert seconds >= 0 and q.sharding.spec[0] is None and "tensor" in tuple(q.sharding.spec)
    assert "fsdp" not in str(q.sharding.spec)
    with pytest.raises(ValueError, match="not multiples of the mesh"):
        RolloutEngine(model, None, Buckets(prompt_lengths=(8,), batch_sizes=(2,)), mesh=mesh)
