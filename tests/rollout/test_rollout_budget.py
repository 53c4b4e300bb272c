"""Rollout in row chunks sized to a KV-cache budget: the same rows as one big call, for the same key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtgrpo_jax.models import ModelConfig
from mtgrpo_jax.rollout import Buckets, RolloutEngine, SamplingParams, kv_cache_bytes_per_row, rollout_chunk_rows
from tests.rollout.test_rollout_engine import make_model

PROMPTS = [[5, 9, 2], [7, 1, 4, 4, 8, 3, 2, 6, 11], [13], [3, 3, 3, 3], [8, 1], [2, 40, 17]]


def test_chunk_rows_arithmetic():
    cfg = ModelConfig(
        num_hidden_layers=36,
        num_key_value_heads=2,
        hidden_size=2048,
        num_attention_heads=16,
        intermediate_size=64,
        vocab_size=64,
    )
    assert kv_cache_bytes_per_row(cfg, 1, jnp.bfloat16) == 36 * 2 * 128 * 2 * 2  # 36 KiB a token (issue 12)
    per_row = kv_cache_bytes_per_row(cfg, 5120, jnp.bfloat16)
    # 10 prompts x 8 samples fit in exactly 10 rows' worth of budget; a prompt's samples are never split
    budget = 10 * 8 * per_row / 2**30
    assert rollout_chunk_rows(cfg, budget, positions=5120, n=8, dtype=jnp.bfloat16) == 80
    assert rollout_chunk_rows(cfg, budget * 0.99, positions=5120, n=8, dtype=jnp.bfloat16) == 72
    assert rollout_chunk_rows(cfg, budget, positions=5120, n=8, dtype=jnp.bfloat16, batch_sizes=(4, 8, 16)) == 64
    assert rollout_chunk_rows(cfg, budget / 4, positions=5120, n=8, dtype=jnp.bfloat16, shards=4) == 80
    with pytest.raises(ValueError, match="kv_cache_budget_gib=0.001 holds no rollout call"):
        rollout_chunk_rows(cfg, 0.001, positions=5120, n=8, dtype=jnp.bfloat16)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(n=3, temperature=0.0, max_new_tokens=6),
        SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=6),
    ],
    ids=["greedy", "sampled"],
)
def test_budgeted_chunks_equal_one_call(params):
    model = make_model("qwen2")
    buckets = Buckets(prompt_lengths=(16,), batch_sizes=(1, 2, 8))
    one = RolloutEngine(model, None, buckets)
    # room for exactly 2 prompts x 3 samples x (16 + 6) positions: chunks of 2, 2, 2 prompts
    per_row = kv_cache_bytes_per_row(model.config, 16 + 6, jnp.float32)
    chunked = RolloutEngine(model, None, buckets, kv_cache_budget_gib=(2 * 3 + 1) * per_row / 2**30)
    key = jax.random.key(7)
    a = one.generate(PROMPTS, params, key)
    b = chunked.generate(PROMPTS, params, key)
    assert one.num_compiles == 1 and chunked.num_compiles == 1  # one bucket of 8 vs one bucket of 2
    assert chunked._cache[0][0] == 2 * 3  # the held cache is the 2-prompt chunk's
    np.testing.assert_array_equal(b.tokens, a.tokens)
    np.testing.assert_array_equal(b.mask, a.mask)
    np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-5)  # batch size moves float32 rounding only
    assert b.finish_reason == a.finish_reason and b.prompt_index.tolist() == a.prompt_index.tolist()
    if params.temperature > 0:  # the samples of one prompt differ (the comparison is not trivially greedy)
        assert len({tuple(t) for t in a.tokens[:3]}) > 1
