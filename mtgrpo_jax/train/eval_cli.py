"""`mtgrpo eval RUN_DIR_OR_MODEL`: per-task accuracy and pass@k on held-out sets, worst-task and average
accuracy, the average relative change against a baseline run, and the steps (hours) a run took to reach
worst-task thresholds."""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import jax

from mtgrpo_jax.config import Config, ConfigError, apply_overrides, from_dict, load_config
from mtgrpo_jax.train.eval_metrics import eval_history, relative_change, steps_to_thresholds
from mtgrpo_jax.train.metrics import read_metrics


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument(
        "target",
        help="a run directory (uses its hf_final model and its config), a model directory "
        "(config.json + safetensors), or 'tiny' for the bundled random-init model",
    )
    p.add_argument(
        "--tasks",
        help="comma-separated: parquet files (verl layout, e.g. the paper's test sets; split "
        "into one task per family and difficulty), or FAMILY:LEVEL:N to generate N items; "
        "default: the run's held-out sets",
    )
    # Each flag below is a shorthand for an `eval.*` override and, when absent, leaves the config's value alone.
    p.add_argument("--n", type=int, help="samples per prompt (eval.n; default 8, the paper's)")
    p.add_argument("--temperature", type=float, help="sampling temperature (eval.temperature; default 1.0; 0 = greedy)")
    p.add_argument("--pass-k", help="comma-separated k for unbiased pass@k (eval.pass_k; default 1)")
    p.add_argument("--max-examples", type=int, help="at most this many prompts per task (eval.max_examples)")
    p.add_argument("--max-new-tokens", type=int, help="eval.max_new_tokens; default: rollout.max_new_tokens")
    p.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float32"],
        help="eval.dtype; default auto: float32 on CPU, else the config's model.dtype",
    )
    p.add_argument("--baseline", help="a run directory whose last evaluation is the baseline for the relative change")
    p.add_argument("--thresholds", default="0.3,0.5", help="worst-task accuracy thresholds for steps-to-threshold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("overrides", nargs="*", help="dotted config overrides (e.g. rollout.prompt_style=compact)")
    return p


_FLAG_KEYS = {
    "n": "eval.n",
    "temperature": "eval.temperature",
    "pass_k": "eval.pass_k",
    "max_examples": "eval.max_examples",
    "max_new_tokens": "eval.max_new_tokens",
    "dtype": "eval.dtype",
}


def _flag_overrides(args) -> list[str]:
    """The flags given, as the `eval.*` overrides they stand for (a flag beats the same dotted override)."""
    out = []
    for attr, key in _FLAG_KEYS.items():
        value = getattr(args, attr)
        if value is None:
            continue
        if attr == "pass_k":
            value = "[" + ",".join(str(int(k)) for k in value.split(",") if k.strip()) + "]"
        out.append(f"{key}={value}")
    return out


def _run_config(target: Path, overrides: list[str]) -> Config:
    if (target / "config.yaml").is_file():
        return load_config(target / "config.yaml", overrides)
    return from_dict(apply_overrides({}, overrides))


def _run_task_names(cfg: Config) -> dict[tuple[str, int], str]:
    """(family, level) -> the run's own name for that task, from its config's held-out (or train) sources."""
    names: dict[tuple[str, int], str] = {}
    for t in cfg.tasks:
        for src in (t.eval, t.train):
            if src is not None and src.level is not None:
                names.setdefault((t.family, src.level), t.name)
                break
    return names


def _align_names(tasks, names: dict[tuple[str, int], str]):
    """Renames `FAMILY-lLEVEL` tasks (from --tasks) to a run's names for the same family and level, so a
    baseline run's records and this evaluation's name the same thing alike."""
    for t in tasks:
        fam, sep, level = t.name.rpartition("-l")
        if sep and level.isdigit() and (fam, int(level)) in names:
            t.name = names[(fam, int(level))]
    return tasks


def _task_sets(spec: str | None, cfg: Config, seed: int, max_examples: int | None):
    from mtgrpo_jax.tasks import load_source
    from mtgrpo_jax.train.setup import RunTask, build_tasks, configured_task

    if not spec:
        if not cfg.tasks:
            raise ConfigError("eval: no --tasks given and the target is not a run directory with tasks")
        return [t for t in build_tasks(cfg) if t.eval]
    out = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        if item.endswith(".parquet"):
            path = Path(item)
            if not path.is_file():
                raise ConfigError(f"eval: --tasks: data file not found: {path}")
            groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
            for ex in load_source(str(path)):
                groups[(ex["task"], int(ex.get("difficulty") or 0))].append(ex)
            for (fam, level), examples in sorted(groups.items()):
                out.append(RunTask(f"{fam}-l{level}", configured_task(fam, cfg), [], examples[:max_examples]))
        else:
            parts = item.split(":")
            if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
                raise ConfigError(f"eval: --tasks: {item!r} is neither a .parquet file nor FAMILY:LEVEL:N")
            fam, level, n = parts[0], int(parts[1]), int(parts[2])
            examples = load_source({"level": level, "n": n, "seed": seed + 1000 + level}, task=fam)
            out.append(RunTask(f"{fam}-l{level}", configured_task(fam, cfg), [], examples))
    return out


def eval_dtype(cfg: Config) -> str:
    """eval.dtype, with auto meaning float32 on CPU (bfloat16 matmuls are slower there) and model.dtype elsewhere."""
    if cfg.eval.dtype != "auto":
        return cfg.eval.dtype
    return "float32" if jax.default_backend() == "cpu" else cfg.model.dtype


def _load_model(target: Path, cfg: Config):
    """(model, tokenizer, mesh). The model directory's own tokenizer files, whichever are there, else
    model.tokenizer (default: the bundled tiny one); a tokenizer that does not fit the model is refused."""
    from mtgrpo_jax.models import load_pretrained, load_tokenizer
    from mtgrpo_jax.models.tokenizer import check_tokenizer_fits, has_tokenizer
    from mtgrpo_jax.parallel import make_mesh
    from mtgrpo_jax.train.setup import build_model

    mesh = make_mesh(data=1, fsdp=jax.device_count(), tensor=1)
    dtype = eval_dtype(cfg)
    if str(target) == "tiny":
        model_cfg = cfg.model.model_copy(update={"init": "random", "dtype": dtype})
        model, tokenizer = build_model(cfg.model_copy(update={"model": model_cfg}), mesh)
        return model, tokenizer, mesh
    model_dir = target / "hf_final" if (target / "hf_final").is_dir() else target
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"eval: {target} is neither a finished run directory (hf_final/) nor a model directory")
    model = load_pretrained(str(model_dir), dtype=dtype, mesh=mesh)
    tok_source = model_dir if has_tokenizer(model_dir) else cfg.model.tokenizer
    tokenizer = load_tokenizer(tok_source)
    check_tokenizer_fits(
        tokenizer,
        model.config.vocab_size,
        f"eval: tokenizer {tok_source or 'bundled tiny tokenizer'} for the model in {model_dir}",
    )
    return model, tokenizer, mesh


def _last_eval_accuracies(run_dir: Path, names: list[str]) -> dict[str, float]:
    evals = [r for r in read_metrics(run_dir) if r.get("split") == "eval"]
    if not evals:
        raise ConfigError(f"eval: --baseline {run_dir}: no evaluation records in its metrics.jsonl")
    last = evals[-1]
    return {n: float(last[f"eval/{n}/accuracy"]) for n in names if f"eval/{n}/accuracy" in last}


def main(argv: list[str], prog: str = "mtgrpo eval") -> int:
    args = _parser(prog).parse_intermixed_args(argv)
    try:
        target = Path(args.target)
        if str(target) != "tiny" and not target.exists():
            raise ConfigError(f"eval: target not found: {target}")
        cfg = _run_config(target, args.overrides + _flag_overrides(args))
        thresholds = [float(t) for t in args.thresholds.split(",") if t]
        model, tokenizer, mesh = _load_model(target, cfg)
        from mtgrpo_jax.train.policy import Policy, resolve_prompts

        cfg, prompt_choice = resolve_prompts(cfg, tokenizer)
        tasks = _task_sets(args.tasks, cfg, args.seed, cfg.eval.max_examples)
        if args.tasks:  # the names a training run gives the same (family, level), the baseline's if not ours
            names = _run_task_names(cfg)
            if args.baseline and (Path(args.baseline) / "config.yaml").is_file():
                names = {**_run_task_names(load_config(Path(args.baseline) / "config.yaml")), **names}
            tasks = _align_names(tasks, names)
        policy = Policy(model, tokenizer, cfg.rollout, mesh)
    except (ConfigError, ValueError, KeyError, FileNotFoundError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    print(f"[mtgrpo] {prompt_choice.describe()}", file=sys.stderr, flush=True)

    from mtgrpo_jax.train.evaluate import evaluate_tasks

    ks = list(cfg.eval.pass_k)
    record = evaluate_tasks(policy, tasks, cfg.eval, cfg.train, step=0, key=jax.random.key(args.seed))
    result = {
        "target": str(target),
        "n": cfg.eval.n,
        "temperature": cfg.eval.temperature,
        "dtype": eval_dtype(cfg),
        "prompt_style": prompt_choice.as_dict(),
        "tasks": {
            t.name: {k.split("/")[-1]: v for k, v in record.items() if k.startswith(f"eval/{t.name}/")} for t in tasks
        },
        "worst_accuracy": record.get("eval/worst_accuracy"),
        "mean_accuracy": record.get("eval/mean_accuracy"),
    }
    accs = {t.name: record[f"eval/{t.name}/accuracy"] for t in tasks}
    if args.baseline:
        try:
            base = _last_eval_accuracies(Path(args.baseline), list(accs))
        except ConfigError as err:
            print(f"{prog}: {err}", file=sys.stderr)
            return 2
        if not base:
            print(
                f"{prog}: --baseline {args.baseline}: its evaluations name none of the tasks {sorted(accs)}",
                file=sys.stderr,
            )
            return 2
        change = relative_change({k: accs[k] for k in base}, base)
        result["relative_change_vs_baseline"] = {
            "mean": change.mean,
            "per_task": change.per_task,
            "skipped": change.skipped,
        }
    if (target / "metrics.jsonl").is_file():
        hits = steps_to_thresholds(eval_history(read_metrics(target)), thresholds)
        result["steps_to_worst_task_threshold"] = {
            str(thr): {"step": None if hit is None else hit.step, "hours": None if hit is None else hit.hours}
            for thr, hit in hits.items()
        }
    if args.json:
        print(json.dumps(result, default=float))
        return 0
    print(f"{'task':<24} {'accuracy':>9} " + " ".join(f"{'pass@' + str(k):>8}" for k in ks))
    for name, vals in result["tasks"].items():
        print(
            f"{name:<24} {vals['accuracy']:>9.3f} "
            + " ".join(f"{vals.get(f'pass@{k}', float('nan')):>8.3f}" for k in ks)
        )
    print(f"{'worst task':<24} {result['worst_accuracy']:>9.3f}\n{'average':<24} {result['mean_accuracy']:>9.3f}")
    if "relative_change_vs_baseline" in result:
        print(f"average relative change vs {args.baseline}: {result['relative_change_vs_baseline']['mean']:+.3f}")
    for thr, hit in result.get("steps_to_worst_task_threshold", {}).items():
        where = "not reached" if hit["step"] is None else f"step {hit['step']} ({hit['hours']:.3f} h)"
        print(f"worst-task accuracy >= {thr}: {where}")
    return 0
