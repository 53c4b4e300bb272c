"""Host-side assembly of rollout groups into the fixed-shape training batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mtgrpo_jax.rollout.packing import pack_left_padded
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


def build_batch(
    groups: list[Group], *, num_rows: int, prompt_len: int, completion_len: int, pad_id: int, rng: np.random.Generator
) -> tuple[Batch, np.ndarray]:
    """Stacks the groups' rows, pads to `num_rows` (padded rows carry no mask, so they weigh nothing) and
    shuffles rows so every mini-batch mixes tasks. Returns the numpy Batch and the row-validity mask."""
    rows = [(g, i) for g in groups for i in range(g.tokens.shape[0])]
    if len(rows) > num_rows:
        raise ValueError(f"{len(rows)} rollouts do not fit a batch of {num_rows} rows")
    # A rollout's mask is a prefix (its tokens up to and including the stop token).
    lengths = [int(g.mask[i, :completion_len].sum()) for g, i in rows]
    padding = [[]] * (num_rows - len(rows))
    ids, attn = pack_left_padded(
        [g.prompt_ids for g, _ in rows] + padding,
        prompt_len,
        pad_id,
        [g.tokens[i, :n] for (g, i), n in zip(rows, lengths)] + padding,
        completion_len,
    )
    cmask = attn[:, prompt_len:]
    old_logp = np.zeros((num_rows, completion_len), np.float32)
    adv = np.zeros((num_rows,), np.float32)
    task_ids = np.zeros((num_rows,), np.int32)
    for row, ((g, i), n) in enumerate(zip(rows, lengths)):
        old_logp[row, :n] = g.logprobs[i, :n]
        adv[row] = g.advantages[i]
        task_ids[row] = g.task_id
    valid = np.arange(num_rows) < len(rows)
    order = rng.permutation(num_rows)
    batch = Batch(
        ids[order], attn[order], cmask[order], old_logp[order], adv[order], task_ids[order], np.zeros_like(old_logp)
    )
    return batch, valid[order]
