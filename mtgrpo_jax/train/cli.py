"""`mtgrpo train` and `mtgrpo sft`: parse, build the trainer, run, print the outcome."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtgrpo_jax.config import METHODS_DIR, Config, ConfigError, dump_config, load_config


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", "-c", help="YAML preset (e.g. configs/demo.yaml); omitted: the defaults")
    p.add_argument(
        "--method",
        help=f"the method preset (a YAML path or a name in {METHODS_DIR}); the config's own "
        "values and its `methods.<name>` block win over it",
    )
    p.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. output_dir=runs/x optim.learning_rate=1e-6"
    )
    return p


def resolve_config(args) -> Config:
    return load_config(args.config, list(args.overrides), method=args.method)


def config_main(argv: list[str], prog: str = "mtgrpo config") -> int:
    args = _parser(
        prog,
        "Print the resolved config as YAML: exactly what `mtgrpo train` with the same arguments "
        "would run, without running it.",
    ).parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ConfigError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(dump_config(cfg))
    return 0


def accuracy_table(history: list[dict], names: list[str]) -> str:
    evals = [r for r in history if r.get("split") == "eval"]
    if not evals:
        return "(no evaluation was run)"
    first, last = evals[0], evals[-1]
    width = max([len(n) for n in names] + [10])
    lines = [f"{'task':<{width}}  {'before RL':>9}  {'after RL':>9}  {'change':>7}", "-" * (width + 33)]
    rows = [(n, f"eval/{n}/accuracy") for n in names] + [
        ("worst task", "eval/worst_accuracy"),
        ("average", "eval/mean_accuracy"),
    ]
    for label, key in rows:
        if key in first and key in last:
            a, b = first[key], last[key]
            lines.append(f"{label:<{width}}  {a:>9.3f}  {b:>9.3f}  {b - a:>+7.3f}")
    lines.append(f"(step {first['step']} -> step {last['step']}; accuracy = mean correctness over samples per prompt)")
    return "\n".join(lines)


def train_main(argv: list[str], prog: str = "mtgrpo train") -> int:
    args = _parser(prog, "Run (or resume) MT-GRPO / GRPO / DAPO / SEC training from a YAML preset.").parse_args(argv)
    try:
        cfg = resolve_config(args)
        from mtgrpo_jax.train.trainer import Trainer

        trainer = Trainer(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"mtgrpo train: {err}", file=sys.stderr)
        return 2
    outcome = trainer.run()
    if trainer.is_primary:
        print(accuracy_table(trainer.history, trainer.names))
        if cfg.logging.report and outcome["status"] == "done":
            from mtgrpo_jax.train.report import write_report

            written = write_report([trainer.run_dir], trainer.run_dir / "report")
            print(f"report: {trainer.run_dir / 'report'} ({len(written)} files)")
        print(f"run directory: {trainer.run_dir}")
    return 0 if outcome["status"] == "done" else 143


def sft_main(argv: list[str], prog: str = "mtgrpo sft") -> int:
    args = _parser(
        prog, "Supervised warm start on task demonstrations; writes the model in Hugging Face layout."
    ).parse_args(argv)
    try:
        cfg = resolve_config(args)
        if cfg.sft.steps <= 0:
            raise ConfigError("config error: sft.steps: must be > 0 for `mtgrpo sft`")
        from mtgrpo_jax.train.trainer import Trainer

        trainer = Trainer(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"mtgrpo sft: {err}", file=sys.stderr)
        return 2
    from flax import nnx

    from mtgrpo_jax.models import save_pretrained
    from mtgrpo_jax.train.sft import run_sft

    trainer.params, record = run_sft(
        cfg, trainer.tasks, trainer.policy, trainer.graphdef, trainer.params, trainer.batch_sharding
    )
    nnx.update(trainer.model, trainer.params)
    out = Path(cfg.output_dir) / "hf_sft"
    save_pretrained(trainer.model, out)  # every process: the sharded parameters are gathered; process 0 writes
    if trainer.is_primary:
        trainer.tokenizer.save_pretrained(out)
        print(
            f"sft: loss {record['sft/loss_first']:.3f} -> {record['sft/loss_last']:.3f} over {record['sft/steps']} steps; "
            f"model written to {out}"
        )
    return 0
