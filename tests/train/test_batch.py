"""The training batch and the left-padded layout: one packing function, checked against the layout
written out by hand (prompt right-aligned at the prompt length, completion after it)."""

import numpy as np
import pytest

from mtgrpo_jax.rollout.packing import pack_left_padded
from mtgrpo_jax.train.batch import Group, build_batch


def _reference(groups, num_rows, prompt_len, completion_len, pad_id):
    """The batch row by row, as the trainer wrote it before the packing was shared."""
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
        for i in range(g.tokens.shape[0]):
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
    return ids, attn, cmask, old_logp, adv, task_ids, valid


def _groups(rng, n_groups, size, length):
    groups = []
    for _ in range(n_groups):
        lengths = rng.integers(0, length + 1, size)
        mask = np.arange(length)[None, :] < lengths[:, None]  # the rollout's masks are prefixes
        groups.append(
            Group(
                int(rng.integers(0, 3)),
                {},
                rng.integers(1, 50, rng.integers(1, 7)).tolist(),
                rng.integers(1, 50, (size, length)).astype(np.int32),
                mask,
                rng.normal(size=(size, length)).astype(np.float32),
                np.zeros(size, np.float32),
                np.zeros(size, bool),
                np.zeros(size, bool),
                rng.normal(size=size).astype(np.float32),
            )
        )
    return groups


@pytest.mark.parametrize("completion_len", [5, 8])
def test_build_batch_matches_the_row_by_row_layout(completion_len):
    rng = np.random.default_rng(0)
    groups = _groups(rng, 3, 4, 6)
    batch, valid = build_batch(
        groups, num_rows=16, prompt_len=8, completion_len=completion_len, pad_id=0, rng=np.random.default_rng(5)
    )
    order = np.random.default_rng(5).permutation(16)
    ids, attn, cmask, old_logp, adv, task_ids, ref_valid = _reference(groups, 16, 8, completion_len, 0)
    for got, want in zip(
        (
            batch.input_ids,
            batch.attention_mask,
            batch.completion_mask,
            batch.old_logp,
            batch.advantages,
            batch.task_ids,
            valid,
        ),
        (ids, attn, cmask, old_logp, adv, task_ids, ref_valid),
    ):
        np.testing.assert_array_equal(got, want[order])
    with pytest.raises(ValueError, match="do not fit"):
        build_batch(groups, num_rows=8, prompt_len=8, completion_len=6, pad_id=0, rng=np.random.default_rng(0))


def test_pack_left_padded():
    ids, mask = pack_left_padded([[5, 6], [7]], 3, -1, [[1, 2, 3], []], 2)
    assert ids.tolist() == [[-1, 5, 6, 1, 2], [-1, -1, 7, -1, -1]]
    assert mask.tolist() == [[False, True, True, True, True], [False, False, True, False, False]]
    ids, mask = pack_left_padded([[5, 6]], 2, 0)
    assert ids.tolist() == [[5, 6]] and mask.all()
    with pytest.raises(ValueError, match="exceeds the prompt length 1"):
        pack_left_padded([[5, 6]], 1, 0)
