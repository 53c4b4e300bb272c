"""Builds what a run needs from its config: the mesh, the model and tokenizer, the tasks and their data,
the task-weight optimizer. Every failure here is a one-line error naming the key or file at fault."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mtgrpo_jax import weighting
from mtgrpo_jax.config import Config, ConfigError, TaskSourceCfg
from mtgrpo_jax.data import DynamicSamplingSampler, RatioPreservingSampler, UniformSampler
from mtgrpo_jax.models import ModelConfig, Transformer, load_pretrained, load_tokenizer, tiny_config
from mtgrpo_jax.parallel import initialize_distributed, make_mesh, shard_model
from mtgrpo_jax.tasks import load_examples, resolve_task
from mtgrpo_jax.tasks.generate import generate_dataset


def build_mesh(cfg: Config):
    initialize_distributed(
        coordinator_address=cfg.distributed.coordinator,
        num_processes=cfg.distributed.num_processes,
        process_id=cfg.distributed.process_id,
    )
    m = cfg.mesh
    try:
        mesh = make_mesh(data=m.data, fsdp=m.fsdp, tensor=m.tensor)
    except ValueError as err:
        raise ConfigError(f"config error: mesh: {err}") from None
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = cfg.sampler.batch_size * cfg.sampler.group_size
    micro_rows = rows // (cfg.optim.mini_batches * cfg.optim.micro_batches)
    if micro_rows % batch_devices:
        raise ConfigError(
            f"config error: sampler.batch_size: micro-batches of {micro_rows} rows do not divide over the mesh's "
            f"data x fsdp = {batch_devices} devices"
        )
    bad = [b for b in cfg.rollout.batch_buckets if b % batch_devices]
    if bad:
        raise ConfigError(f"config error: rollout.batch_buckets: {bad} are not multiples of the mesh's data x fsdp = "
                          f"{batch_devices} devices")
    return mesh


def build_model(cfg: Config, mesh) -> tuple[Transformer, Any]:
    mc = cfg.model
    dtype = jnp.bfloat16 if mc.dtype == "bfloat16" else jnp.float32
    if mc.init == "pretrained" and mc.path is not None:
        model = load_pretrained(mc.path, dtype=mc.dtype, mesh=mesh)
    else:
        base = ModelConfig.from_hf(mc.path) if mc.path is not None else tiny_config()
        if mc.overrides:
            try:
                base = ModelConfig.from_hf({**base.to_hf_dict(), **mc.overrides})
            except (TypeError, ValueError) as err:
                raise ConfigError(f"config error: model.overrides: {err}") from None
        model = Transformer(base, rngs=nnx.Rngs(cfg.seed), dtype=dtype, param_dtype=dtype)
        model = shard_model(model, mesh)
    tok_path = mc.tokenizer
    if tok_path is None and mc.path is not None and Path(mc.path).is_dir() and (Path(mc.path) / "tokenizer_config.json").exists():
        tok_path = mc.path
    tokenizer = load_tokenizer(tok_path)
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(
            f"config error: model.tokenizer: {len(tokenizer)} tokens do not fit the model's vocab_size {model.config.vocab_size}"
        )
    return model, tokenizer


@dataclass
class RunTask:
    """One task of the run: its name, its verifier family, and its train / held-out examples."""

    name: str
    family: Any  # a Task (verifier + prompt builder)
    train: list[dict]
    eval: list[dict] = field(default_factory=list)


def _load_source(src: TaskSourceCfg, family_name: str, cache_dir: str, where: str) -> list[dict]:
    if src.path is not None:
        path = Path(src.path)
        if not path.exists():
            raise ConfigError(f"config error: {where}.path: data file not found: {path}")
        examples = load_examples(path)
        if src.data_source is not None:
            examples = [e for e in examples if e.get("data_source") == src.data_source]
        if src.level is not None:
            examples = [e for e in examples if int(e.get("difficulty") or -1) == src.level]
        if src.n is not None:
            examples = examples[: src.n]
    else:
        # reasoning-gym generation, cached as parquet under data_dir. Process 0 writes, the others wait and
        # then read its cache (or, where data_dir is not shared, generate the same seeded items themselves).
        split = "test" if where.endswith(".eval") else "train"
        out_dir = str(Path(cache_dir) / f"seed{src.seed}")
        generate = lambda: generate_dataset([family_name], [src.level], src.n, out_dir, seed=src.seed,  # noqa: E731
                                            split=split, progress=False)
        if jax.process_index() == 0:
            paths = generate()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"data:{where}")
            if jax.process_index() != 0:
                paths = generate()
        examples = load_examples(next(iter(paths.values())))[: src.n]
    if not examples:
        raise ConfigError(f"config error: {where}: no examples")
    return examples


def with_task_options(family, cfg: Config):
    """A task family with the run's prompt style, demonstration style and answer reader (families without
    options, e.g. a user's own, are used as they are)."""
    if not hasattr(family, "with_options"):
        return family
    options = dict(prompt_style=cfg.rollout.prompt_style, demonstration_style=cfg.sft.demonstration_style)
    if cfg.train.box_last_line_only:
        options["box_last_line_only"] = True
    return family.with_options(**options)


def build_tasks(cfg: Config) -> list[RunTask]:
    if not cfg.tasks:
        raise ConfigError("config error: tasks: at least one task is needed")
    out = []
    for i, t in enumerate(cfg.tasks):
        try:
            family = with_task_options(resolve_task(t.family), cfg)
        except (KeyError, ValueError, ImportError) as err:
            raise ConfigError(f"config error: tasks.{i}.family: {err}") from None
        train = _load_source(t.train, t.family, cfg.data_dir, f"tasks.{i}.train")
        held_out = _load_source(t.eval, t.family, cfg.data_dir, f"tasks.{i}.eval") if t.eval is not None else []
        out.append(RunTask(t.name, family, train, held_out))
    return out


def resample_rounds(s) -> int:
    """Resampling rounds after the first generation that `sampler.resample_budget` allows: the budget
    itself (Algorithm 2 counts resamples), or one less when it counts every generation as the release's
    `max_num_gen_batches` does (trainer/ppo/ray_trainer.py: `num_gen_batches < max_num_gen_batches`
    after each round, the first included; <= 0 there means unlimited, which is refused here)."""
    if s.budget_counts == "resamples":
        return s.resample_budget
    if s.resample_budget < 1:
        raise ConfigError("config error: sampler.resample_budget: must be >= 1 when sampler.budget_counts is "
                          "'generations' (it counts the first generation too)")
    return s.resample_budget - 1


def build_sampler(cfg: Config, num_tasks: int):
    s = cfg.sampler
    rounds = resample_rounds(s)
    if s.kind == "ratio_preserving":
        return RatioPreservingSampler(num_tasks, s.batch_size, s.group_size, oversample=s.oversample,
                                      resample_budget=rounds, acceptance_cap=s.acceptance_cap,
                                      rho_decay=s.rho_decay, min_acceptance=s.min_acceptance,
                                      acceptance_aware=s.acceptance_aware, variant=s.variant,
                                      deterministic_inflation=s.deterministic_inflation, seed=cfg.seed)
    if s.kind == "plain":
        return UniformSampler(num_tasks, s.batch_size, s.group_size, follow_weights=True, seed=cfg.seed)
    return DynamicSamplingSampler(num_tasks, s.batch_size, s.group_size, oversample=s.oversample,
                                  resample_budget=rounds, follow_weights=True, seed=cfg.seed)


def build_weight_optimizer(cfg: Config, num_tasks: int):
    w = cfg.weighting
    if w.kind == "mt_grpo":
        if w.released_parity:
            return weighting.mt_grpo_released(w.lam, learning_rate=w.learning_rate, weight_decay=w.weight_decay,
                                              improvement_clip=w.improvement_clip)
        return weighting.mt_grpo(w.lam, learning_rate=w.learning_rate, weight_decay=w.weight_decay,
                                 improvement_clip=w.improvement_clip)
    if w.kind == "regularized":
        if w.released_parity:
            return weighting.regularized_released(w.eta, lam=w.lam, learning_rate=w.learning_rate,
                                                  steps_per_update=cfg.optim.mini_batches)
        return weighting.regularized(w.eta, learning_rate=w.learning_rate, lam=w.lam)
    if w.kind == "sec":
        return weighting.sec(alpha=w.alpha, temperature=w.temperature)
    if w.kind == "static":
        return weighting.static(jnp.asarray(w.weights, jnp.float32))
    return weighting.uniform()


def improvement_mode(cfg: Config) -> str:
    """Which improvement estimator the update runs: only MT-GRPO's Subroutine 1 reads I_k (Subroutine 2 is
    reward-only), so every other weighting skips its cost."""
    return cfg.weighting.improvement if cfg.weighting.kind == "mt_grpo" else "none"


__all__ = ["build_mesh", "build_model", "build_tasks", "build_sampler", "build_weight_optimizer", "improvement_mode",
           "resample_rounds", "with_task_options",
           "RunTask"]
