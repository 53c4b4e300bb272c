"""`mtgrpo bench step`: where a training step's time goes, how well the update uses the machine, and what the
MT-GRPO machinery costs against a DAPO step on the same config.

- Phase times (sampling bookkeeping, rollout, scoring, update, improvement, weight update) are the trainer's
  own per-step records, averaged over the measured steps (the first steps, which compile, are discarded).
- The update's model-FLOPs utilisation: 6 x (non-embedding parameters) x (tokens through the update) per
  optimizer step plus the attention matmuls, over the update's time, against this machine's dense matmul
  peak measured in the same run (a large jitted matmul of the model's dtype), and against the GPU's datasheet
  peak when on a known GPU.
- MT-GRPO overhead: (sampling bookkeeping + improvement forward + weight update) as a fraction of the MT-GRPO
  step, and the step time against a DAPO step (same config, `--method dapo`), for each improvement estimator
  (`weighting.improvement`: the release's minibatch_sum, the original step_mean, the free fresh one).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mtgrpo_jax.config import ConfigError, load_config
from mtgrpo_jax.train.metrics import peak_memory_bytes

ROOT = Path(__file__).resolve().parents[2]
PHASES = ("sampling", "rollout", "scoring", "old_logprobs", "update", "improvement", "weights")
ESTIMATORS = ("minibatch_sum", "step_mean", "fresh")
# bf16 dense tensor-core peaks (FLOP/s), datasheet figures without sparsity.
GPU_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def measure_matmul_peak(dtype=jnp.float32, size: int = 2048, repeats: int = 5) -> float:
    """Dense matmul FLOP/s of this machine's first device, best of `repeats` (after compilation)."""
    a = jnp.ones((size, size), dtype)
    b = jnp.ones((size, size), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def _step_flops(trainer, seq_len: int) -> float:
    c = trainer.model.config
    per_layer = (
        c.hidden_size * c.head_dim * (c.num_attention_heads * 2 + c.num_key_value_heads * 2)
        + 3 * c.hidden_size * c.intermediate_size
    )
    dense_params = c.num_hidden_layers * per_layer + c.hidden_size * c.vocab_size
    tokens = trainer.rows * seq_len
    attention = 2 * 2 * c.num_hidden_layers * trainer.rows * seq_len * seq_len * c.num_attention_heads * c.head_dim
    return 3 * (2 * dense_params * tokens + attention)  # forward 1x, backward 2x


def run_method(config: str | None, method: str, overrides: list[str], steps: int, warmup: int) -> dict:
    from mtgrpo_jax.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            config,
            [*overrides, f"output_dir={tmp}/run", "logging.console=false", "logging.tensorboard=false", "sft.steps=0"],
            method=method,
        )
        trainer = Trainer(cfg)
        records = []
        seq_lens = []
        for i in range(warmup + steps):
            rec = trainer.train_step()
            if i >= warmup:
                records.append(rec)
                seq_lens.append(rec["train/seq_len"])
        out = {f"time/{p}": float(np.mean([r.get(f"time/{p}", 0.0) for r in records])) for p in PHASES}
        out["time/step"] = float(np.mean([r["time/step"] for r in records]))
        out["rollout/tokens_per_s"] = float(np.mean([r["rollout/tokens_per_s"] for r in records]))
        out["sampler/rounds"] = float(np.mean([r["sampler/rounds"] for r in records]))
        out["update_flops"] = _step_flops(trainer, int(np.mean(seq_lens)))
        out["update_flops_per_s"] = out["update_flops"] / max(out["time/update"], 1e-9)
        out["model_params"] = trainer.model.config.num_params()
        out["dtype"] = cfg.model.dtype
        out["peak_memory_bytes"] = peak_memory_bytes()  # so far in this process: the largest method's steps
        return out


def _train_time(r: dict) -> float:
    return r["time/old_logprobs"] + r["time/update"] + r["time/improvement"] + r["time/weights"]


def estimator_agreement(run_dir: str | Path) -> dict:
    """How the improvement estimators agree on one trajectory: a run with `weighting.improvement_diagnostics`
    logs every estimator's per-task I_k each step. Against the paper's (step_mean: J_k after the update minus
    before, on the whole batch): the Pearson correlation of I_k (pooled over steps and tasks; and of the
    per-step z-scores across tasks, which is what moves the weights), and the task weights each produces
    when it drives the run's own weight optimizer (paper form, one step per training step) on the run's
    rewards: the mean and largest |z_e - z_paper| over steps, and the final weights. `step_mean_x_n` is the
    paper's estimator multiplied by each task's sequence count in the batch (the release's scale)."""
    from mtgrpo_jax.config import load_config
    from mtgrpo_jax.weighting import TaskSignals, mt_grpo

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    names = [t.name for t in cfg.tasks]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if f"task/{names[0]}/improvement/step_mean" in r]
    if not steps:
        raise ValueError(
            f"{run_dir}: no per-estimator improvements logged (run with weighting.improvement_diagnostics=true)"
        )
    series = {e: np.array([[r[f"task/{n}/improvement/{e}"] for n in names] for r in steps]) for e in ESTIMATORS}
    counts = np.array(
        [[r[f"task/{n}/share"] * r["sampler/groups_kept"] * cfg.sampler.group_size for n in names] for r in steps]
    )
    series["step_mean_x_n"] = series["step_mean"] * counts
    rewards = np.array([[r[f"task/{n}/reward"] for n in names] for r in steps])
    w = cfg.weighting

    def zscore(x):
        return (x - x.mean(1, keepdims=True)) / np.maximum(x.std(1, keepdims=True), 1e-12)

    def weights(improvement):
        opt = mt_grpo(
            w.lam, learning_rate=w.learning_rate, weight_decay=w.weight_decay, improvement_clip=w.improvement_clip
        )
        state, update, out = opt.init(len(names)), jax.jit(opt.update), []
        for j, i in zip(rewards, improvement):
            z, state = update(
                TaskSignals(reward=jnp.asarray(j, jnp.float32), improvement=jnp.asarray(i, jnp.float32)), state
            )
            out.append(np.asarray(z))
        return np.array(out)

    ref = series["step_mean"]
    ref_w = weights(ref)
    out = {
        "run": str(run_dir),
        "steps": len(steps),
        "tasks": names,
        "lam": w.lam,
        "driven_by": w.improvement,
        "weights_step_mean_final": ref_w[-1].round(4).tolist(),
        "estimators": {},
    }
    for e, x in series.items():
        z = weights(x)
        out["estimators"][e] = {
            "mean_abs_improvement": float(np.abs(x).mean()),
            "corr_vs_step_mean": float(np.corrcoef(x.ravel(), ref.ravel())[0, 1]),
            "corr_of_task_zscores_vs_step_mean": float(np.corrcoef(zscore(x).ravel(), zscore(ref).ravel())[0, 1]),
            "weights_mean_abs_diff_vs_step_mean": float(np.abs(z - ref_w).mean()),
            "weights_max_abs_diff_vs_step_mean": float(np.abs(z - ref_w).max()),
            "weights_final": z[-1].round(4).tolist(),
        }
    return out


def main(argv: list[str], prog: str = "mtgrpo bench step") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "bench_step.yaml"), help="the config to measure")
    p.add_argument("--steps", type=int, default=3, help="measured steps per method")
    p.add_argument("--warmup", type=int, default=2, help="steps discarded first (compilation)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--estimators",
        default=",".join(ESTIMATORS),
        help="improvement estimators to time against DAPO (comma-separated; the first is `mt_grpo`)",
    )
    p.add_argument(
        "--agreement",
        metavar="RUN_DIR",
        help="instead: how the improvement estimators agree on a run trained with "
        "weighting.improvement_diagnostics=true (JSON)",
    )
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.agreement:
        try:
            print(json.dumps(estimator_agreement(args.agreement)))
        except (OSError, ValueError, ConfigError) as err:
            print(f"{prog}: --agreement: {err}", file=sys.stderr)
            return 2
        return 0
    try:
        base = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    # The method presets set their own sampler defaults; both methods get the config's sampling budget and
    # filter so that the comparison isolates the MT-GRPO machinery.
    s = base.sampler
    shared = [
        *args.overrides,
        f"sampler.resample_budget={s.resample_budget}",
        f"sampler.oversample={s.oversample}",
        f"sampler.filter={s.filter}",
    ]
    estimators = [e for e in args.estimators.split(",") if e]
    bad = sorted(set(estimators) - set(ESTIMATORS))
    if bad or not estimators:
        print(f"{prog}: --estimators: unknown {bad or 'empty'}; choose from {list(ESTIMATORS)}", file=sys.stderr)
        return 2
    # DAPO gets the same budget counting as MT-GRPO, so the two generate the same number of rounds.
    shared.append(f"sampler.budget_counts={s.budget_counts}")
    runs = {
        e: run_method(args.config, "mt_grpo", [*shared, f"weighting.improvement={e}"], args.steps, args.warmup)
        for e in estimators
    }
    mt = runs[estimators[0]]
    dapo = run_method(args.config, "dapo", shared, args.steps, args.warmup)
    dtype = jnp.bfloat16 if mt["dtype"] == "bfloat16" else jnp.float32
    peak = measure_matmul_peak(dtype)
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", str(device))
    result = {
        "device": kind,
        "platform": device.platform,
        "num_devices": jax.device_count(),
        "matmul_peak_flops": peak,
        "mt_grpo": mt,
        "dapo": dapo,
        "update_mfu_vs_measured_peak": mt["update_flops_per_s"] / peak,
        "mt_grpo_machinery_fraction": (mt["time/sampling"] + mt["time/improvement"] + mt["time/weights"])
        / mt["time/step"],
        "step_time_ratio_vs_dapo": mt["time/step"] / dapo["time/step"],
        # Per estimator: the step's non-rollout work (old log-probs, update, improvement, weights) against
        # DAPO's, which isolates the estimator's cost from the rollout's sampling noise, and the whole step.
        "estimators": {
            e: {
                "time/step": r["time/step"],
                "time/old_logprobs": r["time/old_logprobs"],
                "time/update": r["time/update"],
                "time/improvement": r["time/improvement"],
                "train_time_ratio_vs_dapo": _train_time(r) / max(_train_time(dapo), 1e-9),
                "step_time_ratio_vs_dapo": r["time/step"] / dapo["time/step"],
            }
            for e, r in runs.items()
        },
    }
    for name, flops in GPU_PEAKS.items():
        if name in kind:
            result["update_mfu_vs_datasheet_peak"] = mt["update_flops_per_s"] / flops
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"device: {kind} x{jax.device_count()}  matmul peak {peak / 1e9:.1f} GFLOP/s ({mt['dtype']})")
    print(f"{'phase (s/step)':<18} {'mt_grpo':>9} {'dapo':>9}")
    for ph in PHASES + ("step",):
        print(f"{ph:<18} {mt[f'time/{ph}']:>9.3f} {dapo[f'time/{ph}']:>9.3f}")
    print(f"update MFU vs measured peak: {result['update_mfu_vs_measured_peak']:.1%}")
    print(
        f"MT-GRPO machinery (sampler bookkeeping + improvement + weights): {result['mt_grpo_machinery_fraction']:.1%} of the step"
    )
    print(f"MT-GRPO step / DAPO step: {result['step_time_ratio_vs_dapo']:.2f}x")
    for e, r in result["estimators"].items():
        print(
            f"  improvement estimator {e:<14} training work {r['train_time_ratio_vs_dapo']:.2f}x DAPO's, "
            f"step {r['step_time_ratio_vs_dapo']:.2f}x"
        )
    return 0
