"""The typed config tree: YAML presets + dotted `key=value` overrides, validated by pydantic.

One source of truth for a run. Every field is reachable from the command line as a dotted override
(`optim.learning_rate=1e-6`, `tasks.0.train.n=100`), unknown keys are rejected, and every error is one line
naming the key at fault. A preset may name base presets with `base: other.yaml` or a list of them (paths relative to
itself), merged in order; the preset's own keys are merged over theirs.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A bad config: the message is one line and names the key or file at fault."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelCfg(_Strict):
    # A local directory or Hub repo id with config.json + safetensors; None = the bundled tiny config.
    path: str | None = None
    # "pretrained": load weights from `path`; "random": random-init from the path's (or bundled) config.json.
    init: Literal["pretrained", "random"] = "pretrained"
    # Overrides of config.json fields for random init (e.g. {"num_hidden_layers": 2}).
    overrides: dict[str, Any] = Field(default_factory=dict)
    tokenizer: str | None = None  # None: the model directory's tokenizer, else the bundled tiny one
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    # Rematerialisation in the backward pass: "none", "block" (recompute each decoder block) or the name of a
    # `jax.checkpoint_policies` policy applied per block (e.g. "dots_with_no_batch_dims_saveable").
    remat: str = "none"
    # Attention of the training / scoring forwards: "xla" (explicit scores), "splash" (Pallas TPU kernel),
    # "cudnn" (GPU flash attention), "auto" (by platform: splash on TPU, cudnn on GPU, xla otherwise).
    attention: Literal["auto", "xla", "splash", "cudnn"] = "auto"

    @field_validator("remat")
    @classmethod
    def _known_remat(cls, value: str) -> str:
        from mtgrpo_jax.models.transformer import remat_name  # jax is imported only when a config is checked

        return remat_name(value)

    # Which prompts suit the checkpoint. base: the released R1-style transcript as raw text. instruct: the
    # task's question as the user turn of the model's chat template. auto: instruct when the tokenizer has a
    # chat template (some base checkpoints, Qwen2.5's among them, ship one: say `base` for those).
    # `rollout.prompt_style` / `rollout.template` override either part. A run records the resolved values.
    kind: Literal["auto", "base", "instruct"] = "auto"


class MeshCfg(_Strict):
    data: int = Field(1, ge=1)
    fsdp: int = Field(-1, ge=-1)  # -1: all devices left over
    tensor: int = Field(1, ge=-1)  # -1 (with fsdp fixed): all devices left over, e.g. fsdp 4 x tensor 2 on 8 chips


class DistributedCfg(_Strict):
    # None everywhere: auto (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, SLURM variables,
    # TPU pod metadata, or a single process).
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


class TaskSourceCfg(_Strict):
    """Where a task's examples come from: files `datasets` reads (parquet, JSON, CSV; or a Hub dataset id), or
    the task family's own generator (cached under data_dir). See `mtgrpo_jax.tasks.load_source`."""

    path: str | None = None  # a file, directory, glob or Hub id; filtered to `level` when set
    # Example field -> the file's column, for files not in verl layout, e.g. {question: prompt, answer: target}.
    columns: dict[str, str] | None = None
    split: str | None = None  # a Hub dataset's split (default "train")
    level: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1)  # generate this many (or keep the first n of the file)
    seed: int = 0
    data_source: str | None = None  # keep only the file's rows with this `data_source` (e.g. "test_math")

    @model_validator(mode="after")
    def _one_source(self) -> TaskSourceCfg:
        if self.path is None and (self.level is None or self.n is None):
            raise ValueError("a task source needs `path`, or `level` and `n` to generate")
        return self


class TaskCfg(_Strict):
    name: str  # the run's name for this task, e.g. "countdown-l1"
    family: (
        str  # a registered task family ("countdown", "zebra", "arc_1d", "math", "arithmetic") or "pkg.module:factory"
    )
    train: TaskSourceCfg
    eval: TaskSourceCfg | None = None
    # The task's share of the warm start's demonstration batches, relative to the other tasks' (all 1:
    # every demonstration row is drawn alike). A task the model should start out weak on gets less.
    sft_weight: float = Field(1.0, gt=0.0)


class SamplerCfg(_Strict):
    # ratio_preserving: Algorithm 2. plain: one round of B groups drawn by the task weights (uniform
    # weights: GRPO). dynamic: rounds of M_os x B groups drawn by the weights, refilled until B survive the
    # filter (uniform weights: DAPO's dynamic sampling; adaptive weights: the weights-only ablation).
    kind: Literal["ratio_preserving", "plain", "dynamic"] = "ratio_preserving"
    batch_size: int = Field(8, ge=1)  # B: groups (prompts) per step after filtering
    group_size: int = Field(8, ge=2)  # G: rollouts per prompt
    oversample: float = Field(3.0, ge=1.0)  # M_os
    # N_rs. With budget_counts "resamples" (Algorithm 2) it counts the rounds after the first generation;
    # with "generations" (the release: trainer/ppo/ray_trainer.py `max_num_gen_batches`, compared with
    # every generation round, the first included) it counts all rounds, so Exp 1's 10 is 10 rounds, not 11.
    resample_budget: int = Field(10, ge=0)
    budget_counts: Literal["resamples", "generations"] = "resamples"
    acceptance_cap: float = Field(5.0, ge=1.0)  # M_acc
    rho_decay: float = Field(0.9, ge=0.0, lt=1.0)
    min_acceptance: float = Field(0.01, gt=0.0, le=1.0)
    # False: m_k = 1, the "without acceptance-aware sampling" ablation (the release turns its
    # `efficient_sampling` on only in Exp 2).
    acceptance_aware: bool = True
    # Ratio preservation (per-task targets and deficits) from this training step on; before it the
    # sampler only refills to B. The release's Exp 2 scripts: `ensure_famo_ratio_from=10`.
    ratio_from_step: int = Field(0, ge=0)
    variant: Literal["paper", "released"] = "paper"
    # released variant: largest-remainder apportionment of the inflated counts instead of the release's
    # random draw on z * m (its `efficient_sampling.deterministic`, off in every script).
    deterministic_inflation: bool = False
    # Zero-gradient filter: strict (Experiment 1), lenient (Experiment 2), none (plain GRPO keeps all groups).
    filter: Literal["strict", "lenient", "none"] = "strict"
    # lenient only: True drops every group whose rewards are all equal (all 0.1 too: zero advantage, the
    # paper's wording); False drops only all-0 and all-1 groups, as the release's
    # `pure_acc_filter=False` does (trainer/ppo/ray_trainer.py, the uid loop).
    lenient_drops_all_equal: bool = True


class RolloutCfg(_Strict):
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0: off
    prompt_buckets: list[int] = Field(default_factory=lambda: [128, 256, 512])
    batch_buckets: list[int] = Field(default_factory=lambda: [4, 8, 16, 32, 64])  # prompts per rollout call
    truncate_prompts: bool = False  # True: keep the prompt's tail and count it, instead of an error
    # released: the R1-style transcript around the task's question; question: the question alone (with its
    # answer-format instruction); compact: a short question for tiny models. None: from model.kind.
    prompt_style: Literal["released", "question", "compact"] | None = None
    # "chat": the tokenizer's chat template wraps the task's messages; "raw": their text joined as is.
    # None: from model.kind (instruct: chat, base: raw).
    template: Literal["chat", "raw"] | None = None
    # KV cache GiB per device one rollout call may hold; larger requests run in row chunks (a prompt's samples
    # kept together) with the same results. None: one call per largest batch bucket, as sized by the buckets.
    kv_cache_budget_gib: float | None = Field(None, gt=0.0)
    system_prompt: str | None = None  # a system turn before the question (chat template only); None: none
    # The decode loop's generated-token cache in blocks of this many slots, read only as far as written (in up
    # to max_phases loops). None: the platform's default (32 on CPU, one block on accelerators); 0: one block.
    attention_block: int | None = Field(None, ge=0)
    max_phases: int | None = Field(None, ge=1)  # None: the rollout engine's default (4)
    # The decode step's attention as one compiled kernel per layer on a single x86-64 CPU device with AVX2
    # and a float32 cache (built on first use; XLA ops where it cannot be). False: always XLA's ops.
    attention_kernel: bool = True


class LossCfg(_Strict):
    advantage: Literal["grpo", "drgrpo", "rloo"] = "grpo"
    std: Literal["unbiased", "biased"] = "unbiased"
    eps_low: float = Field(0.2, ge=0.0)
    eps_high: float = Field(0.2, ge=0.0)
    dual_clip: float | None = Field(None, gt=1.0)
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    beta: float = Field(0.0, ge=0.0)  # KL coefficient; 0 means no reference model at all
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    entropy_coef: float = Field(0.0, ge=0.0)
    # Token logprobs and entropy in rematerialised chunks, so float32 [rows, T, vocab] logits are never held:
    # positions per chunk (0: the whole completion) and vocabulary slice per chunk (0: the whole vocabulary).
    logprob_chunk: int = Field(0, ge=0)
    vocab_chunk: int = Field(0, ge=0)


class OptimCfg(_Strict):
    learning_rate: float = Field(1e-6, gt=0.0)
    b1: float = Field(0.9, ge=0.0, lt=1.0)
    b2: float = Field(0.99, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.01, ge=0.0)
    grad_clip: float | None = Field(1.0, gt=0.0)
    warmup_steps: int = Field(0, ge=0)
    mini_batches: int = Field(4, ge=1)  # optimizer steps per training step (the paper: 4)
    # Gradient accumulation inside each mini-batch. "auto": the fewest micro-batches whose update program fits
    # the device's memory (compiled and measured at start-up; on CPU, float32 logits under 1 GiB per device;
    # see mtgrpo_jax.train.plan.resolve_micro_batches).
    micro_batches: int | Literal["auto"] = 1
    recompute_old_logprobs: bool = False  # False: the rollout engine's logprobs serve as old-policy logprobs

    @field_validator("micro_batches", mode="before")
    @classmethod
    def _micro_batches(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError("must be a positive integer or 'auto'")


class WeightingCfg(_Strict):
    kind: Literal["mt_grpo", "regularized", "sec", "static", "uniform"] = "uniform"
    lam: float = Field(0.2, ge=0.0)
    learning_rate: float = Field(0.025, gt=0.0)
    weight_decay: float = Field(1e-5, ge=0.0)
    eta: float = Field(0.01, gt=0.0)  # regularized (Subroutine 2): the pull of the logits toward 0
    alpha: float = Field(0.5, gt=0.0, le=1.0)  # sec
    temperature: float = Field(0.2, gt=0.0)  # sec
    weights: list[float] | None = None  # static
    # The released code's optimizer (mtgrpo_jax.weighting.mt_grpo_released / regularized_released): one
    # coupled-L2 Adam step per policy mini-batch, reward an EMA (0.5, from 0, every generation round) of
    # batch accuracy, absent tasks stepped with I = 0 and lam * J. For `regularized`: lam * J only, with
    # eta as the weight decay of those Adam steps (the release's Subroutine 2).
    released_parity: bool = False
    # The improvement estimator (mtgrpo_jax.train.update.IMPROVEMENT_ESTIMATORS): "minibatch_sum" (the
    # release's scale, per mini-batch sums over sequences: what the published lam values were tuned at),
    # "step_mean" (the project's original per-task token-mean change over the step, ~1/N_k of that
    # scale) or "fresh" (free, from the update's own forwards, release scale).
    improvement: Literal["minibatch_sum", "step_mean", "fresh"] = "minibatch_sum"
    # |I| bound: per mini-batch for the released optimizer, on the step's sum for the paper's. The paper's
    # appendix: 0.1 or 0.2; the release: 0.1 (Exp 2: 0.2 for lam 0.1 / 0.9 / 1.2). None: no clip. (The
    # release multiplies its bound by policy_lr / 1e-6, which is 1 at the published lr 1e-6.)
    improvement_clip: float | None = Field(None, gt=0.0)
    # "recompute": the batch's old log-probs are recomputed by the training forward before the update
    # whenever an improvement is measured (the release recomputes them for every method), so no gap
    # between the rollout's and the training forward's numerics leaks into the small I_k. "sampler": the
    # rollout's log-probs (unless optim.recompute_old_logprobs).
    improvement_old_logprobs: Literal["recompute", "sampler"] = "recompute"
    # Compute every estimator each step (logged as task/<name>/improvement/<estimator>), the run still
    # driven by `improvement`: for measuring how they agree (costs the extra forwards).
    improvement_diagnostics: bool = False


class StageCfg(_Strict):
    """One stage of sequential training: only these tasks are sampled for `steps` steps."""

    tasks: list[str] = Field(min_length=1)
    steps: int = Field(ge=1)


class TrainCfg(_Strict):
    steps: int = Field(100, ge=0)
    # Sequential training (the paper's sequential baselines: one family at a time): consecutive stages whose
    # steps add up to `steps`; the task weights are restricted to the stage's tasks. Empty: every task.
    stages: list[StageCfg] = Field(default_factory=list)
    # The answer reader: True reads the \boxed{} on the completion's last line only, as the released
    # verifier does (verl/verl/utils/reward_score/utils.py `extract_solution`); False: the last box anywhere.
    box_last_line_only: bool = False
    eval_every: int = Field(10, ge=0)  # 0: only before and after training
    checkpoint_every: int = Field(10, ge=0)  # 0: only at the end (and on SIGTERM)
    keep_checkpoints: int = Field(2, ge=1)
    score_workers: int = Field(4, ge=1)
    score_timeout_s: float = Field(2.0, gt=0.0)


class EvalCfg(_Strict):
    n: int = Field(8, ge=1)  # samples per prompt
    # `mtgrpo eval`'s compute dtype. auto: float32 on CPU (where bfloat16 matmuls are slower), else model.dtype.
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    temperature: float = Field(1.0, ge=0.0)
    max_examples: int | None = Field(None, ge=1)  # per task; None: the whole held-out set
    max_new_tokens: int | None = Field(None, ge=1)  # None: rollout.max_new_tokens
    pass_k: list[int] = Field(default_factory=lambda: [1])


class SftCfg(_Strict):
    steps: int = Field(0, ge=0)  # 0: no warm start
    learning_rate: float = Field(1e-3, gt=0.0)
    batch_size: int = Field(32, ge=1)
    examples_per_task: int = Field(256, ge=1)
    # "reasoning": a <think> trace then the boxed answer; "answer": the boxed answer alone (tiny models).
    demonstration_style: Literal["reasoning", "answer"] = "reasoning"
    weight_decay: float = Field(0.0, ge=0.0)


class LoggingCfg(_Strict):
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "mtgrpo_jax"
    console: bool = True
    report: bool = False  # write the report (plots + tables) at the end


class Config(_Strict):
    method: str = "custom"  # informational: the preset's name
    seed: int = 0
    output_dir: str = "runs/default"
    data_dir: str = "data_cache"  # reasoning-gym generation cache
    model: ModelCfg = Field(default_factory=ModelCfg)
    mesh: MeshCfg = Field(default_factory=MeshCfg)
    distributed: DistributedCfg = Field(default_factory=DistributedCfg)
    tasks: list[TaskCfg] = Field(default_factory=list)
    sampler: SamplerCfg = Field(default_factory=SamplerCfg)
    rollout: RolloutCfg = Field(default_factory=RolloutCfg)
    loss: LossCfg = Field(default_factory=LossCfg)
    optim: OptimCfg = Field(default_factory=OptimCfg)
    weighting: WeightingCfg = Field(default_factory=WeightingCfg)
    train: TrainCfg = Field(default_factory=TrainCfg)
    eval: EvalCfg = Field(default_factory=EvalCfg)
    sft: SftCfg = Field(default_factory=SftCfg)
    logging: LoggingCfg = Field(default_factory=LoggingCfg)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tasks: duplicate task name {dupes[0]!r}")
        k = len(self.tasks)
        if self.weighting.kind == "static":
            w = self.weighting.weights
            if w is None or len(w) != k or min(w) < 0 or sum(w) <= 0:
                raise ValueError(f"weighting.weights: static weights need {k} non-negative numbers with a positive sum")
        if self.train.stages:
            total = sum(stage.steps for stage in self.train.stages)
            if total != self.train.steps:
                raise ValueError(
                    f"train.stages: the stages' steps add up to {total}, not train.steps={self.train.steps}"
                )
            for i, stage in enumerate(self.train.stages):
                unknown = sorted(set(stage.tasks) - set(names))
                if unknown:
                    raise ValueError(f"train.stages.{i}.tasks: no task named {unknown[0]!r} (tasks: {names})")
        rows = self.sampler.batch_size * self.sampler.group_size
        micro = 1 if self.optim.micro_batches == "auto" else self.optim.micro_batches
        per_update = self.optim.mini_batches * micro
        if rows % per_update:
            raise ValueError(
                f"sampler.batch_size: {self.sampler.batch_size} groups x {self.sampler.group_size} rollouts = {rows} rows "
                f"do not split into optim.mini_batches x optim.micro_batches = {per_update} equal parts"
            )
        return self


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config {path}: `base` chain loops back to itself")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"config {path}: not valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: the top level must be a mapping")
    bases = data.pop("base", None) or []
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, _read_yaml(path.parent / base, seen + (path,)))
    return _merge(merged, data)


def _base_files(path: Path, seen: tuple[Path, ...] = ()) -> list[Path]:
    """Every file the `base` chain of `path` reads (resolved paths, `path` itself excluded)."""
    path = path.resolve()
    if path in seen or not path.is_file():
        return []
    data = yaml.safe_load(path.read_text()) or {}
    bases = data.get("base") or [] if isinstance(data, dict) else []
    out = []
    for base in [bases] if isinstance(bases, str) else bases:
        b = (path.parent / base).resolve()
        out += [b] + _base_files(b, seen + (path,))
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = tree
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"override {dotted!r}: {'.'.join(keys[:i]) or 'root'} has no item {key!r}")
            if last:
                node[int(key)] = value
            else:
                node = node[int(key)]
            continue
        if last:
            node[key] = value
        else:
            if node.get(key) is None:
                node[key] = {}
            node = node[key]


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    tree = copy.deepcopy(tree)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key, value)
    return tree


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"config error: unknown key {loc!r}"
    msg = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    more = len(err.errors()) - 1
    tail = f" [and {more} more]" if more else ""
    where = f"{loc}: " if loc else ""
    return f"config error: {where}{msg}{shown}{tail}"


def from_dict(tree: dict) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


# Shipped inside the package, so a wheel install has them too (configs/methods in the repo links here).
METHODS_DIR = Path(__file__).resolve().parent / "presets" / "methods"


def method_preset_path(name: str) -> Path:
    """A method preset by name (`configs/methods/NAME.yaml`) or by path."""
    path = Path(name)
    return path if path.suffix else METHODS_DIR / f"{name}.yaml"


def resolve_tree(
    path: str | os.PathLike | None, overrides: list[str] | None = None, method: str | os.PathLike | None = None
) -> dict:
    """The merged config tree a run uses, before validation. Later layers win:

        defaults  <  the method preset  <  the experiment file  <  its `methods.<method>` block  <  overrides

    The method is `method` (a name in configs/methods/ or a YAML path) or else the file's own `method:`
    key when a preset of that name exists. An experiment therefore keeps its own filter, lam, weight
    decay and budget whatever method runs on it, and states what differs per method (e.g. the
    ablation's lam) in its `methods:` block; a method preset owns what the experiment leaves unsaid
    (sampler kind, weighting kind, clip range, ...)."""
    tree = _read_yaml(Path(path)) if path is not None else {}
    if method is not None and path is not None:
        inherited = [b for b in _base_files(Path(path)) if b.parent == METHODS_DIR.resolve()]
        chosen = method_preset_path(str(method)).resolve()
        if any(b != chosen for b in inherited):
            raise ConfigError(
                f"config {path}: its `base` includes the method preset {inherited[0].name}, which would "
                f"win over --method; name the default method with `method: {inherited[0].stem}` instead"
            )
    per_method = tree.pop("methods", None) or {}
    if not isinstance(per_method, dict):
        raise ConfigError(f"config {path}: `methods` must map method names to config blocks")
    name = method if method is not None else tree.get("method")
    base: dict = {}
    if name is not None:
        preset = method_preset_path(str(name))
        if preset.is_file():
            if path is None or preset.resolve() != Path(path).resolve():
                base = _read_yaml(preset)
        elif method is not None:
            raise ConfigError(f"config error: --method: no preset {str(method)!r} ({preset} not found)")
    tree = _merge(base, tree)
    if base.get("method") is not None:
        tree["method"] = base["method"]
    block = per_method.get(tree.get("method"), {})
    if not isinstance(block, dict):
        raise ConfigError(f"config {path}: methods.{tree.get('method')} must be a mapping")
    tree = _merge(tree, block)
    return apply_overrides(tree, list(overrides or []))


def load_config(
    path: str | os.PathLike | None,
    overrides: list[str] | None = None,
    presets: list[str | os.PathLike] = (),
    method: str | os.PathLike | None = None,
) -> Config:
    """Reads a YAML config with its method preset (see `resolve_tree`), applies dotted overrides,
    validates. `presets` are further YAML files merged over the file (before its `methods` block)."""
    if presets:
        if method is not None or len(presets) > 1:
            raise ConfigError("config error: give one method preset")
        method = presets[0]
    return from_dict(resolve_tree(path, overrides, method))


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (what `save_config` writes and `mtgrpo config` prints)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(dump_config(cfg))
