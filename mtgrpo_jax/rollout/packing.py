"""Token rows in the one layout every program here reads: the prompt left-padded to a fixed length, so
all prompts end at the same column and generation continues there, then the completion right-padded."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pack_left_padded(
    prompts: Sequence[Sequence[int]],
    prompt_len: int,
    pad_id: int,
    completions: Sequence[Sequence[int]] | None = None,
    completion_len: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [N, prompt_len + completion_len], attention mask bool, same shape).

    Row i holds prompt i ending at column `prompt_len`, then completion i (cut to `completion_len`);
    the mask marks the real tokens of both."""
    if completions is not None and len(completions) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    ids = np.full((len(prompts), prompt_len + completion_len), pad_id, np.int32)
    mask = np.zeros(ids.shape, bool)
    for i, prompt in enumerate(prompts):
        if len(prompt) > prompt_len:
            raise ValueError(f"prompt of {len(prompt)} tokens exceeds the prompt length {prompt_len}")
        ids[i, prompt_len - len(prompt) : prompt_len] = prompt
        mask[i, prompt_len - len(prompt) : prompt_len] = True
        if completions is not None:
            completion = list(completions[i])[:completion_len]
            ids[i, prompt_len : prompt_len + len(completion)] = completion
            mask[i, prompt_len : prompt_len + len(completion)] = True
    return ids, mask
