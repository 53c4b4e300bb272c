"""Builds what a run needs from its config: the mesh, the model and tokenizer, the tasks and their data,
the task-weight optimizer. Every failure here is a one-line error naming the key or file at fault."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mtgrpo_jax import weighting
from mtgrpo_jax.config import Config, ConfigError, TaskSourceCfg
from mtgrpo_jax.data import make_sampler
from mtgrpo_jax.models import ModelConfig, Transformer, load_pretrained, load_tokenizer, tiny_config
from mtgrpo_jax.models.tokenizer import check_tokenizer_fits, has_tokenizer
from mtgrpo_jax.parallel import initialize_distributed, make_mesh, shard_model
from mtgrpo_jax.tasks import load_source, resolve_task
from mtgrpo_jax.train.update import make_optimizer


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
    check_mesh(cfg, mesh)
    return mesh


def check_mesh(cfg: Config, mesh) -> None:
    """The batch shapes the config asks for divide over the mesh's batch devices (also `mtgrpo plan`'s check)."""
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = cfg.sampler.batch_size * cfg.sampler.group_size
    micro = 1 if cfg.optim.micro_batches == "auto" else cfg.optim.micro_batches  # auto: resolved by the trainer
    micro_rows = rows // (cfg.optim.mini_batches * micro)
    if micro_rows % batch_devices:
        raise ConfigError(
            f"config error: sampler.batch_size: micro-batches of {micro_rows} rows do not divide over the mesh's "
            f"data x fsdp = {batch_devices} devices"
        )
    bad = [b for b in cfg.rollout.batch_buckets if b % batch_devices]
    if bad:
        raise ConfigError(
            f"config error: rollout.batch_buckets: {bad} are not multiples of the mesh's data x fsdp = "
            f"{batch_devices} devices"
        )


def build_model(cfg: Config, mesh) -> tuple[Transformer, Any]:
    mc = cfg.model
    dtype = jnp.bfloat16 if mc.dtype == "bfloat16" else jnp.float32
    if mc.init == "pretrained" and mc.path is not None:
        model = load_pretrained(mc.path, dtype=mc.dtype, mesh=mesh, remat=mc.remat, attention=mc.attention)
    else:
        base = ModelConfig.from_hf(mc.path) if mc.path is not None else tiny_config()
        if mc.overrides:
            try:
                base = ModelConfig.from_hf({**base.to_hf_dict(), **mc.overrides})
            except (TypeError, ValueError) as err:
                raise ConfigError(f"config error: model.overrides: {err}") from None
        model = Transformer(
            base, rngs=nnx.Rngs(cfg.seed), dtype=dtype, param_dtype=dtype, remat=mc.remat, attention=mc.attention
        )
        model = shard_model(model, mesh)
    tok_path = mc.tokenizer
    if tok_path is None and has_tokenizer(mc.path):
        tok_path = mc.path
    tokenizer = load_tokenizer(tok_path)
    try:
        check_tokenizer_fits(tokenizer, model.config.vocab_size, "config error: model.tokenizer")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return model, tokenizer


@dataclass
class RunTask:
    """One task of the run: its name, its Task (prompts, verifier), and its train / held-out examples."""

    name: str
    task: Any  # a Task (verifier + prompt builder), its family's class configured for the run
    train: list[dict]
    eval: list[dict] = field(default_factory=list)


def configured_task(family: str, cfg: Config):
    """The Task a config's `family` names, with the run's prompt style, demonstration style and answer reader."""
    return with_task_options(resolve_task(family), cfg)


def load_task_source(src: TaskSourceCfg, family: str, cache_dir: str, where: str) -> list[dict]:
    """A task source's examples. Generated data is cached under data_dir: process 0 writes, the others wait
    and then read its cache (or, where data_dir is not shared, generate the same seeded items themselves)."""
    spec = src.model_dump(exclude_none=True, exclude_defaults=False)
    split = "test" if where.endswith(".eval") else "train"

    def load() -> list[dict]:
        try:
            return load_source(spec, task=family, cache_dir=cache_dir, split=split)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"config error: {where}: {err}") from None

    if jax.process_index() == 0:
        examples = load()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"data:{where}")
        if jax.process_index() != 0:
            examples = load()
    if not examples:
        raise ConfigError(f"config error: {where}: no examples")
    return examples


def with_task_options(task, cfg: Config):
    """A Task with the run's prompt style, demonstration style and answer reader (Tasks without options,
    e.g. a user's own protocol-only one, are used as they are)."""
    if not hasattr(task, "with_options"):
        return task
    options = dict(prompt_style=cfg.rollout.prompt_style, demonstration_style=cfg.sft.demonstration_style)
    if cfg.train.box_last_line_only:
        options["box_last_line_only"] = True
    return task.with_options(**options)


def build_tasks(cfg: Config) -> list[RunTask]:
    if not cfg.tasks:
        raise ConfigError("config error: tasks: at least one task is needed")
    out = []
    for i, t in enumerate(cfg.tasks):
        try:
            task = configured_task(t.family, cfg)
        except (KeyError, ValueError, ImportError) as err:
            raise ConfigError(f"config error: tasks.{i}.family: {err}") from None
        train = load_task_source(t.train, t.family, cfg.data_dir, f"tasks.{i}.train")
        held_out = load_task_source(t.eval, t.family, cfg.data_dir, f"tasks.{i}.eval") if t.eval is not None else []
        out.append(RunTask(t.name, task, train, held_out))
    return out


# The sampler settings each config kind takes, besides the resampling rounds.
_SAMPLER_SETTINGS = {
    "ratio_preserving": (
        "oversample",
        "acceptance_cap",
        "rho_decay",
        "min_acceptance",
        "acceptance_aware",
        "variant",
        "deterministic_inflation",
    ),
    "plain": (),
    "dynamic": ("oversample",),
}


def resample_rounds(s) -> int:
    """Resampling rounds after the first generation that `sampler.resample_budget` allows: the budget
    itself (Algorithm 2 counts resamples), or one less when it counts every generation as the release's
    `max_num_gen_batches` does (trainer/ppo/ray_trainer.py: `num_gen_batches < max_num_gen_batches`
    after each round, the first included; <= 0 there means unlimited, which is refused here)."""
    if s.budget_counts == "resamples":
        return s.resample_budget
    if s.resample_budget < 1:
        raise ConfigError(
            "config error: sampler.resample_budget: must be >= 1 when sampler.budget_counts is "
            "'generations' (it counts the first generation too)"
        )
    return s.resample_budget - 1


def build_sampler(cfg: Config, num_tasks: int):
    s = cfg.sampler
    settings = {name: getattr(s, name) for name in _SAMPLER_SETTINGS[s.kind]}
    if s.kind != "plain":
        settings["resample_budget"] = resample_rounds(s)
    if s.kind != "ratio_preserving":
        settings["follow_weights"] = True  # the plain kinds draw tasks by the task weights
    return make_sampler(s.kind, num_tasks, s.batch_size, s.group_size, seed=cfg.seed, **settings)


def build_policy_optimizer(cfg: Config):
    """The policy's optimizer from `optim` (one place, so the trainer and `mtgrpo plan` build the same one)."""
    o = cfg.optim
    return make_optimizer(
        o.learning_rate,
        b1=o.b1,
        b2=o.b2,
        weight_decay=o.weight_decay,
        grad_clip=o.grad_clip,
        warmup_steps=o.warmup_steps,
    )


def build_weight_optimizer(cfg: Config, num_tasks: int):
    w = cfg.weighting
    if w.kind == "mt_grpo":
        if w.released_parity:
            return weighting.mt_grpo_released(
                w.lam, learning_rate=w.learning_rate, weight_decay=w.weight_decay, improvement_clip=w.improvement_clip
            )
        return weighting.mt_grpo(
            w.lam, learning_rate=w.learning_rate, weight_decay=w.weight_decay, improvement_clip=w.improvement_clip
        )
    if w.kind == "regularized":
        if w.released_parity:
            return weighting.regularized_released(
                w.eta, lam=w.lam, learning_rate=w.learning_rate, steps_per_update=cfg.optim.mini_batches
            )
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


__all__ = [
    "build_mesh",
    "check_mesh",
    "build_model",
    "build_tasks",
    "build_sampler",
    "build_policy_optimizer",
    "build_weight_optimizer",
    "configured_task",
    "improvement_mode",
    "load_task_source",
    "resample_rounds",
    "with_task_options",
    "RunTask",
]
