"""Supervised warm start on task demonstrations, for models too small to earn any reward at first."""

from __future__ import annotations

import time

import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from mtgrpo_jax.parallel import host_to_global
from mtgrpo_jax.parallel.mesh import on_mesh
from mtgrpo_jax.train.batch import pick_bucket
from mtgrpo_jax.train.update import init_opt_state, make_sft_update_fn


def demonstration_rows(trainer) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids ending in the end-of-turn token) for each demonstrable train example."""
    cfg = trainer.cfg.sft
    policy = trainer.policy
    rows = []
    for task in trainer.tasks:
        for ex in task.train[: cfg.examples_per_task]:
            text = task.family.demonstration(ex)
            if text is None:
                continue
            completion = policy.tokenizer(text, add_special_tokens=False)["input_ids"] + [policy.end_of_turn_id]
            rows.append((policy.prompt_ids(task.family, ex), completion))
    if not rows:
        raise ValueError("sft: no task could produce a demonstration (sft.steps > 0 needs at least one)")
    return rows


def run_sft(trainer) -> dict:
    cfg = trainer.cfg.sft
    t0 = time.perf_counter()
    rows = demonstration_rows(trainer)
    prompt_len = pick_bucket(max(len(p) for p, _ in rows), trainer.cfg.rollout.prompt_buckets)
    completion_len = -(-max(len(c) for _, c in rows) // 16) * 16
    n = len(rows)
    ids = np.full((n, prompt_len + completion_len), trainer.policy.pad_id, np.int32)
    attn = np.zeros_like(ids, bool)
    target = np.zeros((n, completion_len), bool)
    for i, (p, c) in enumerate(rows):
        c = c[:completion_len]
        ids[i, prompt_len - len(p) : prompt_len] = p
        ids[i, prompt_len : prompt_len + len(c)] = c
        attn[i, prompt_len - len(p) : prompt_len + len(c)] = True
        target[i, : len(c)] = True
    tx = optax.adamw(cfg.learning_rate, b1=0.9, b2=0.99, weight_decay=cfg.weight_decay)
    opt_state = init_opt_state(tx, trainer.params, trainer.mesh)
    update = on_mesh(trainer.mesh, make_sft_update_fn(trainer.graphdef, tx, completion_len,
                                                      seq_chunk=trainer.cfg.loss.logprob_chunk,
                                                      vocab_chunk=trainer.cfg.loss.vocab_chunk))
    rng = np.random.default_rng([trainer.cfg.seed, 0x5F7])
    losses = []
    bar = tqdm(range(cfg.steps), desc="sft warm start", disable=not (trainer.cfg.logging.console and trainer.is_primary))
    params = trainer.params
    for _ in bar:
        idx = rng.choice(n, size=cfg.batch_size, replace=n < cfg.batch_size)
        b = host_to_global((ids[idx], attn[idx], target[idx]), trainer.batch_sharding)
        params, opt_state, loss = update(params, opt_state, *b)
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    trainer.params = params
    nnx.update(trainer.model, params)
    tail = losses[-max(1, len(losses) // 10):]
    return {"step": 0, "split": "sft", "sft/steps": cfg.steps, "sft/examples": n, "sft/loss_first": losses[0],
            "sft/loss_last": float(np.mean(tail)), "time/sft": time.perf_counter() - t0}
