"""The policy as the host loop sees it: model + tokenizer + rollout engine + prompt encoding.

Shared by training, evaluation and `mtgrpo eval`, so all three build prompts and stop sequences the same way.
"""

from __future__ import annotations

import json
from typing import Any

import jax
from flax import nnx

from mtgrpo_jax.config import RolloutCfg
from mtgrpo_jax.rollout import Sampler, SamplingParams


def encode_prompt(tokenizer, messages: list[dict], template: str) -> list[int]:
    """Token ids of a task's chat messages: the tokenizer's chat template when it has one (and `template`
    is "chat"), else the messages' text joined."""
    if template == "chat" and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer("\n".join(m["content"] for m in messages), add_special_tokens=False)["input_ids"]


class Policy:
    def __init__(self, model, tokenizer, rollout_cfg: RolloutCfg, mesh=None):
        self.model = model
        self.tokenizer = tokenizer
        self.rollout_cfg = rollout_cfg
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.rollout = Sampler(
            model,
            tokenizer,
            buckets=dict(prompt_lengths=rollout_cfg.prompt_buckets, batch_sizes=rollout_cfg.batch_buckets),
            mesh=mesh,
            truncate_prompts=rollout_cfg.truncate_prompts,
        )
        ids = set(model.config.eos_token_ids)
        for tok in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")):
            if isinstance(tok, int) and tok >= 0 and tok != tokenizer.unk_token_id:
                ids.add(tok)
        self.stop_ids = sorted(ids)
        # The end-of-turn token a demonstration ends with (what the chat template closes a turn with).
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.end_of_turn_id = im_end if im_end in ids else self.stop_ids[0]
        self._prompt_cache: dict[tuple[str, str], list[int]] = {}

    def prompt_ids(self, family, example: dict[str, Any]) -> list[int]:
        key = (family.name, example.get("question", "") + json.dumps(example.get("answer"), sort_keys=True, default=str))
        ids = self._prompt_cache.get(key)
        if ids is None:
            ids = encode_prompt(self.tokenizer, family.prompt(example), self.rollout_cfg.template)
            self._prompt_cache[key] = ids
        return ids

    def generate(self, prompts: list[list[int]], key: jax.Array, *, n: int, temperature: float | None = None,
                 max_new_tokens: int | None = None, top_p: float | None = None, top_k: int | None = None,
                 params=None):
        """Samples n completions per prompt. `params`: the parameters to sample with (the trainer passes its
        current ones on every call, so nothing has to keep the model object in step with them); None: the
        model's own."""
        if params is not None:
            nnx.update(self.model, params)
        r = self.rollout_cfg
        params = SamplingParams(
            n=n,
            temperature=r.temperature if temperature is None else temperature,
            top_p=r.top_p if top_p is None else top_p,
            top_k=r.top_k if top_k is None else top_k,
            max_new_tokens=max_new_tokens or r.max_new_tokens,
            stop_token_ids=self.stop_ids,
        )
        return self.rollout.generate(prompts, params, key)
