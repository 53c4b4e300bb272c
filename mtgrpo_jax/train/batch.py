"""Host-side assembly of rollout groups into the fixed-shape training batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mtgrpo_jax.train.update import Batch


@dataclass
class Group:
    """One prompt's G rollouts, scored, with their advantages (the sampler's payload)."""

    task_id: int
    example: dict[str, Any]
    prompt_ids: list[int]
    tokens: np.ndarray  # [G, T] int32
    mask: np.ndarray  # [G, T] bool
    logprobs: np.ndarray  # [G, T] float32
    rewards: np.ndarray  # [G] float32
    correct: np.ndarray  # [G] bool
    formatted: np.ndarray  # [G] bool
    advantages: np.ndarray  # [G] float32
    finish_stop: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # [G] True where a stop token ended it


def pick_bucket(length: int, buckets: list[int]) -> int:
    for b in sorted(buckets):
        if length <= b:
            return b
    raise ValueError(f"prompt of {length} tokens exceeds the largest prompt bucket {max(buckets)} (rollout.prompt_buckets)")


def build_batch(groups: list[Group], *, num_rows: int, prompt_len: int, completion_len: int, pad_id: int,
                rng: np.random.Generator) -> tuple[Batch, np.ndarray]:
    """Stacks the groups' rows, pads to `num_rows` (padded rows carry no mask, so they weigh nothing) and
    shuffles rows so every mini-batch mixes tasks. Returns the numpy Batch and the row-validity mask."""
    seq = prompt_len + completion_len
    ids = np.full((num_rows, seq), pad_id, np.int32)
    attn = np.zeros((num_rows, seq), bool)
    cmask = np.zeros((num_rows, completion_len), bool)
    old_logp = np.zeros((num_rows, completion_len), np.float32)
    adv = np.zeros((num_rows,), np.float32)
    task_ids = np.zeros((num_rows,), np.int32)
    valid = np.zeros((num_rows,), bool)
    row = 0
    for g in groups:
        p = np.asarray(g.prompt_ids, np.int32)
        if len(p) > prompt_len:
            raise ValueError(f"prompt of {len(p)} tokens exceeds the batch's prompt length {prompt_len}")
        for i in range(g.tokens.shape[0]):
            if row >= num_rows:
                raise ValueError(f"{sum(x.tokens.shape[0] for x in groups)} rollouts do not fit a batch of {num_rows} rows")
            ids[row, prompt_len - len(p) : prompt_len] = p
            attn[row, prompt_len - len(p) : prompt_len] = True
            m = g.mask[i, :completion_len]
            ids[row, prompt_len : prompt_len + len(m)] = np.where(m, g.tokens[i, :completion_len], pad_id)
            attn[row, prompt_len : prompt_len + len(m)] = m
            cmask[row, : len(m)] = m
            old_logp[row, : len(m)] = np.where(m, g.logprobs[i, :completion_len], 0.0)
            adv[row] = g.advantages[i]
            task_ids[row] = g.task_id
            valid[row] = True
            row += 1
    order = rng.permutation(num_rows)
    batch = Batch(ids[order], attn[order], cmask[order], old_logp[order], adv[order], task_ids[order],
                  np.zeros_like(old_logp))
    return batch, valid[order]
