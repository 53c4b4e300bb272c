"""The policy as the host loop sees it: model + tokenizer + rollout engine + prompt encoding.

Shared by training, evaluation and `mtgrpo eval`, so all three build prompts and stop sequences the same way:
`resolve_prompts` picks the prompts that suit the checkpoint (base: the raw transcript; instruct: the question in
the model's chat template), and `models.encode_prompt` (over `models.prompt_text`) is the one encoder.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
from flax import nnx

from mtgrpo_jax.config import Config, RolloutCfg
from mtgrpo_jax.models.tokenizer import encode_prompt, has_chat_template
from mtgrpo_jax.rollout import RolloutEngine, SamplingParams

# (task prompt style, template) each kind of checkpoint gets unless `rollout.*` says otherwise.
PROMPTS_FOR_KIND = {"base": ("released", "raw"), "instruct": ("question", "chat")}


@dataclasses.dataclass(frozen=True)
class PromptChoice:
    kind: str  # "base" | "instruct"
    reason: str  # why that kind
    prompt_style: str
    template: str
    overridden: tuple[str, ...]  # the rollout.* keys that overrode the kind's default

    def describe(self) -> str:
        what = {
            ("released", "raw"): "the released R1-style transcript as raw text",
            ("question", "chat"): "the task's question as the user turn of the model's chat template",
        }
        how = what.get(
            (self.prompt_style, self.template), f"prompt_style {self.prompt_style!r} through template {self.template!r}"
        )
        extra = f"; overridden by {', '.join(self.overridden)}" if self.overridden else ""
        return f"prompts: {self.kind} model ({self.reason}): {how}{extra}"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_prompts(cfg: Config, tokenizer) -> tuple[Config, PromptChoice]:
    """The prompt style a run uses, and the config with it written in (model.kind, rollout.prompt_style,
    rollout.template no longer left to `auto` / None), so the saved config records what ran."""
    declared = cfg.model.kind
    if declared == "auto":
        kind = "instruct" if has_chat_template(tokenizer) else "base"
        reason = "the tokenizer has a chat template" if kind == "instruct" else "the tokenizer has no chat template"
    else:
        kind, reason = declared, f"model.kind={declared}"
    style, template = PROMPTS_FOR_KIND[kind]
    overridden = []
    if cfg.rollout.prompt_style is not None and cfg.rollout.prompt_style != style:
        style = cfg.rollout.prompt_style
        overridden.append(f"rollout.prompt_style={style}")
    if cfg.rollout.template is not None and cfg.rollout.template != template:
        template = cfg.rollout.template
        overridden.append(f"rollout.template={template}")
    choice = PromptChoice(kind, reason, style, template, tuple(overridden))
    cfg = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"kind": kind}),
            "rollout": cfg.rollout.model_copy(update={"prompt_style": style, "template": template}),
        }
    )
    return cfg, choice


def build_engine(model, tokenizer, rollout_cfg: RolloutCfg, mesh=None) -> RolloutEngine:
    """The rollout engine as the config sets it up (also what `mtgrpo plan` compiles)."""
    return RolloutEngine(
        model,
        tokenizer,
        buckets=dict(prompt_lengths=rollout_cfg.prompt_buckets, batch_sizes=rollout_cfg.batch_buckets),
        mesh=mesh,
        truncate_prompts=rollout_cfg.truncate_prompts,
        kv_cache_budget_gib=rollout_cfg.kv_cache_budget_gib,
        attention_block={None: "auto", 0: None}.get(rollout_cfg.attention_block, rollout_cfg.attention_block),
        **({} if rollout_cfg.max_phases is None else {"max_phases": rollout_cfg.max_phases}),
        attention_kernel=rollout_cfg.attention_kernel,
    )


class Policy:
    def __init__(self, model, tokenizer, rollout_cfg: RolloutCfg, mesh=None):
        self.model = model
        self.tokenizer = tokenizer
        self.rollout_cfg = rollout_cfg
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.engine = build_engine(model, tokenizer, rollout_cfg, mesh)
        ids = set(model.config.eos_token_ids)
        for tok in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")):
            if isinstance(tok, int) and tok >= 0 and tok != tokenizer.unk_token_id:
                ids.add(tok)
        self.stop_ids = sorted(ids)
        # The end-of-turn token a demonstration ends with (what the chat template closes a turn with).
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.end_of_turn_id = im_end if im_end in ids else self.stop_ids[0]
        self._prompt_cache: dict[tuple[str, str], list[int]] = {}

    def prompt_ids(self, task, example: dict[str, Any]) -> list[int]:
        key = (task.name, example.get("question", "") + json.dumps(example.get("answer"), sort_keys=True, default=str))
        ids = self._prompt_cache.get(key)
        if ids is None:
            messages = task.prompt(example)
            if self.rollout_cfg.system_prompt is not None:
                messages = [{"role": "system", "content": self.rollout_cfg.system_prompt}, *messages]
            ids = encode_prompt(self.tokenizer, messages, self.rollout_cfg.template or "chat")
            self._prompt_cache[key] = ids
        return ids

    def generate(
        self,
        prompts: list[list[int]],
        key: jax.Array,
        *,
        n: int,
        temperature: float | None = None,
        max_new_tokens: int | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        params=None,
    ):
        """Samples n completions per prompt. `params`: the parameters to sample with (the trainer passes its
        current ones on every call, so nothing has to keep the model object in step with them); None: the
        model's own."""
        if params is not None:
            nnx.update(self.model, params)
        r = self.rollout_cfg
        sampling = SamplingParams(
            n=n,
            temperature=r.temperature if temperature is None else temperature,
            top_p=r.top_p if top_p is None else top_p,
            top_k=r.top_k if top_k is None else top_k,
            max_new_tokens=max_new_tokens or r.max_new_tokens,
            stop_token_ids=self.stop_ids,
        )
        return self.engine.generate(prompts, sampling, key)
