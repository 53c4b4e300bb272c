"""Supervised warm start on task demonstrations, for models too small to earn any reward at first."""

from __future__ import annotations

import time
from collections import Counter

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from mtgrpo_jax.config import Config
from mtgrpo_jax.parallel import host_to_global
from mtgrpo_jax.parallel.mesh import on_mesh
from mtgrpo_jax.rollout import Buckets
from mtgrpo_jax.rollout.packing import pack_left_padded
from mtgrpo_jax.train.update import init_opt_state, make_sft_update_fn


def demonstration_rows(tasks, policy, examples_per_task: int) -> list[tuple[str, list[int], list[int]]]:
    """(task name, prompt ids, completion ids ending in the end-of-turn token) for each demonstrable train
    example of `tasks` (the run's tasks: name, Task, train examples)."""
    rows = []
    for run_task in tasks:
        for ex in run_task.train[:examples_per_task]:
            text = run_task.task.demonstration(ex)
            if text is None:
                continue
            completion = policy.tokenizer(text, add_special_tokens=False)["input_ids"] + [policy.end_of_turn_id]
            rows.append((run_task.name, policy.prompt_ids(run_task.task, ex), completion))
    if not rows:
        raise ValueError("sft: no task could produce a demonstration (sft.steps > 0 needs at least one)")
    return rows


def row_probabilities(names: list[str], sft_weight: dict[str, float]) -> np.ndarray | None:
    """Each demonstration row's probability of being drawn, so that a task's share of the draws is its
    `sft_weight` over the sum of the weights of the tasks that have rows. None when every weight is 1:
    rows are then drawn alike (each task's share is its share of the rows), the draw without weights."""
    if all(sft_weight.get(name, 1.0) == 1.0 for name in set(names)):
        return None
    counts = Counter(names)
    p = np.array([sft_weight.get(name, 1.0) / counts[name] for name in names])
    return p / p.sum()


def run_sft(cfg: Config, tasks, policy, graphdef, params, batch_sharding) -> tuple[object, dict]:
    """`cfg.sft.steps` supervised steps on the tasks' demonstrations, from `params` (the model's nnx.Param
    state, split with `graphdef`). Returns the new parameters and the metrics record."""
    sft = cfg.sft
    t0 = time.perf_counter()
    named = demonstration_rows(tasks, policy, sft.examples_per_task)
    rows = [(p, c) for _, p, c in named]
    probs = row_probabilities([name for name, _, _ in named], {t.name: t.sft_weight for t in cfg.tasks})
    longest = max(len(p) for p, _ in rows)
    try:
        prompt_len = Buckets.pick(sorted(cfg.rollout.prompt_buckets), longest)
    except ValueError:
        raise ValueError(
            f"sft: a prompt of {longest} tokens exceeds the largest prompt bucket "
            f"{max(cfg.rollout.prompt_buckets)} (rollout.prompt_buckets)"
        ) from None
    completion_len = -(-max(len(c) for _, c in rows) // 16) * 16
    n = len(rows)
    ids, attn = pack_left_padded([p for p, _ in rows], prompt_len, policy.pad_id, [c for _, c in rows], completion_len)
    target = attn[:, prompt_len:]
    tx = optax.adamw(sft.learning_rate, b1=0.9, b2=0.99, weight_decay=sft.weight_decay)
    opt_state = init_opt_state(tx, params, batch_sharding.mesh)
    update = on_mesh(
        batch_sharding.mesh,
        make_sft_update_fn(
            graphdef, tx, completion_len, seq_chunk=cfg.loss.logprob_chunk, vocab_chunk=cfg.loss.vocab_chunk
        ),
    )
    rng = np.random.default_rng([cfg.seed, 0x5F7])
    losses = []
    show = cfg.logging.console and jax.process_index() == 0
    bar = tqdm(range(sft.steps), desc="sft warm start", disable=not show)
    for _ in bar:
        if probs is None:
            idx = rng.choice(n, size=sft.batch_size, replace=n < sft.batch_size)
        else:
            idx = rng.choice(n, size=sft.batch_size, p=probs)
        b = host_to_global((ids[idx], attn[idx], target[idx]), batch_sharding)
        params, opt_state, loss = update(params, opt_state, *b)
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    tail = losses[-max(1, len(losses) // 10) :]
    return params, {
        "step": 0,
        "split": "sft",
        "sft/steps": sft.steps,
        "sft/examples": n,
        "sft/loss_first": losses[0],
        "sft/loss_last": float(np.mean(tail)),
        "time/sft": time.perf_counter() - t0,
    }
