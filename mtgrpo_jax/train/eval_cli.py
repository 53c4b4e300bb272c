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
    p.add_argument("target", help="a run directory (uses its hf_final model and its config), a model directory "
                                  "(config.json + safetensors), or 'tiny' for the bundled random-init model")
    p.add_argument("--tasks", help="comma-separated: parquet files (verl layout, e.g. the paper's test sets; split "
                                   "into one task per family and difficulty), or FAMILY:LEVEL:N to generate N items; "
                                   "default: the run's held-out sets")
    p.add_argument("--n", type=int, default=8, help="samples per prompt (the paper: 8)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (the paper: 1.0; 0 = greedy)")
    p.add_argument("--pass-k", default="1", help="comma-separated k for unbiased pass@k")
    p.add_argument("--max-examples", type=int, help="at most this many prompts per task")
    p.add_argument("--max-new-tokens", type=int, help="default: the config's rollout.max_new_tokens")
    p.add_argument("--baseline", help="a run directory whose last evaluation is the baseline for the relative change")
    p.add_argument("--thresholds", default="0.3,0.5", help="worst-task accuracy thresholds for steps-to-threshold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("overrides", nargs="*", help="dotted config overrides (e.g. rollout.prompt_style=compact)")
    return p


def _run_config(target: Path, overrides: list[str]) -> Config:
    if (target / "config.yaml").is_file():
        return load_config(target / "config.yaml", overrides)
    return from_dict(apply_overrides({}, overrides))


def _task_sets(spec: str | None, cfg: Config, seed: int, max_examples: int | None):
    from mtgrpo_jax.tasks import load_examples, resolve_task
    from mtgrpo_jax.tasks.generate import generate_examples
    from mtgrpo_jax.train.setup import RunTask, build_tasks

    def family(name: str):
        task = resolve_task(name)
        if not hasattr(task, "with_options"):
            return task
        options = dict(prompt_style=cfg.rollout.prompt_style)
        if cfg.train.box_last_line_only:
            options["box_last_line_only"] = True
        return task.with_options(**options)

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
            for ex in load_examples(path):
                groups[(ex["task"], int(ex.get("difficulty") or 0))].append(ex)
            for (fam, level), examples in sorted(groups.items()):
                out.append(RunTask(f"{fam}-l{level}", family(fam), [], examples[:max_examples]))
        else:
            parts = item.split(":")
            if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
                raise ConfigError(f"eval: --tasks: {item!r} is neither a .parquet file nor FAMILY:LEVEL:N")
            fam, level, n = parts[0], int(parts[1]), int(parts[2])
            out.append(RunTask(f"{fam}-l{level}", family(fam), [], generate_examples(fam, level, n, seed + 1000 + level)))
    return out


def _load_policy(target: Path, cfg: Config):
    from mtgrpo_jax.models import load_pretrained, load_tokenizer
    from mtgrpo_jax.parallel import make_mesh
    from mtgrpo_jax.train.policy import Policy
    from mtgrpo_jax.train.setup import build_model

    mesh = make_mesh(data=1, fsdp=jax.device_count(), tensor=1)
    if str(target) == "tiny":
        model, tokenizer = build_model(cfg.model_copy(update={"model": cfg.model.model_copy(update={"init": "random"})}), mesh)
    else:
        model_dir = target / "hf_final" if (target / "hf_final").is_dir() else target
        if not (model_dir / "config.json").is_file():
            raise ConfigError(f"eval: {target} is neither a finished run directory (hf_final/) nor a model directory")
        model = load_pretrained(str(model_dir), dtype=cfg.model.dtype, mesh=mesh)
        tokenizer = load_tokenizer(str(model_dir) if (model_dir / "tokenizer_config.json").exists() else cfg.model.tokenizer)
    return Policy(model, tokenizer, cfg.rollout, mesh)


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
        cfg = _run_config(target, args.overrides)
        ks = [int(k) for k in args.pass_k.split(",") if k]
        thresholds = [float(t) for t in args.thresholds.split(",") if t]
        tasks = _task_sets(args.tasks, cfg, args.seed, args.max_examples)
        policy = _load_policy(target, cfg)
    except (ConfigError, ValueError, KeyError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2

    from mtgrpo_jax.train.evaluate import evaluate_tasks

    eval_cfg = cfg.eval.model_copy(update=dict(n=args.n, temperature=args.temperature, max_examples=args.max_examples,
                                               max_new_tokens=args.max_new_tokens, pass_k=ks))
    record = evaluate_tasks(policy, tasks, eval_cfg, cfg.train, step=0, key=jax.random.key(args.seed))
    result = {"target": str(target), "n": args.n, "temperature": args.temperature,
              "tasks": {t.name: {k.split("/")[-1]: v for k, v in record.items() if k.startswith(f"eval/{t.name}/")}
                        for t in tasks},
              "worst_accuracy": record.get("eval/worst_accuracy"), "mean_accuracy": record.get("eval/mean_accuracy")}
    accs = {t.name: record[f"eval/{t.name}/accuracy"] for t in tasks}
    if args.baseline:
        base = _last_eval_accuracies(Path(args.baseline), list(accs))
        change = relative_change({k: accs[k] for k in base}, base)
        result["relative_change_vs_baseline"] = {"mean": change.mean, "per_task": change.per_task, "skipped": change.skipped}
    if (target / "metrics.jsonl").is_file():
        hits = steps_to_thresholds(eval_history(read_metrics(target)), thresholds)
        result["steps_to_worst_task_threshold"] = {
            str(thr): {"step": None if hit is None else hit.step, "hours": None if hit is None else hit.hours}
            for thr, hit in hits.items()}
    if args.json:
        print(json.dumps(result, default=float))
        return 0
    print(f"{'task':<24} {'accuracy':>9} " + " ".join(f"{'pass@' + str(k):>8}" for k in ks))
    for name, vals in result["tasks"].items():
        print(f"{name:<24} {vals['accuracy']:>9.3f} " + " ".join(f"{vals.get(f'pass@{k}', float('nan')):>8.3f}" for k in ks))
    print(f"{'worst task':<24} {result['worst_accuracy']:>9.3f}\n{'average':<24} {result['mean_accuracy']:>9.3f}")
    if "relative_change_vs_baseline" in result:
        print(f"average relative change vs {args.baseline}: {result['relative_change_vs_baseline']['mean']:+.3f}")
    for thr, hit in result.get("steps_to_worst_task_threshold", {}).items():
        where = "not reached" if hit["step"] is None else f"step {hit['step']} ({hit['hours']:.3f} h)"
        print(f"worst-task accuracy >= {thr}: {where}")
    return 0
