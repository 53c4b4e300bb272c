"""Rollout engine: jitted prefill + `while_loop` decode over a donated KV cache, with temperature,
top-k, top-p and greedy sampling, per-row stopping, log-probs and shape buckets."""

from mtgrpo_jax.rollout.engine import (
    Buckets,
    RolloutEngine,
    RolloutOutput,
    SamplingParams,
    kv_cache_bytes_per_row,
    rollout_chunk_rows,
    to_serve_layout,
)

__all__ = [
    "Buckets",
    "RolloutEngine",
    "RolloutOutput",
    "SamplingParams",
    "kv_cache_bytes_per_row",
    "rollout_chunk_rows",
    "to_serve_layout",
]
