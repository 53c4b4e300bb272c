"""The `mtgrpo` command. It only parses the subcommand and hands the rest of argv to the room
that owns it, so each room keeps its own flags next to its code."""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import sys

# subcommand path -> "module:function"; the function takes the remaining argv and returns an exit code.
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("train",): ("mtgrpo_jax.train.cli:train_main", "run (or resume) a training run from a YAML config"),
    ("sft",): ("mtgrpo_jax.train.cli:sft_main", "supervised warm start on task demonstrations"),
    ("config",): ("mtgrpo_jax.train.cli:config_main", "print the resolved config (what train would run) as YAML"),
    ("eval",): ("mtgrpo_jax.train.eval_cli:main", "evaluate a run directory or a model on task test sets"),
    ("generate",): ("mtgrpo_jax.rollout.cli:generate_main", "sample completions from a model"),
    ("data", "generate"): ("mtgrpo_jax.tasks.generate:main", "generate and cache task data as parquet"),
    ("bench", "rollout"): ("mtgrpo_jax.rollout.bench:main", "rollout tokens/s against transformers"),
    ("bench", "step"): ("mtgrpo_jax.train.bench:main", "training step time by phase, MFU"),
    ("convert",): ("mtgrpo_jax.models.gguf:main", "convert a GGUF model (Llama, Qwen2) to the Hugging Face layout"),
    ("plan",): (
        "mtgrpo_jax.train.plan_cli:main",
        "compile a step for a TPU slice ahead of time: memory, FLOPs, step time",
    ),
    ("report",): ("mtgrpo_jax.train.report:main", "plots and tables from run directories or an experiment directory"),
    ("experiment",): ("mtgrpo_jax.experiment:main", "methods x seeds x grid points, paired by seed, then the report"),
}


def _usage() -> str:
    lines = ["usage: mtgrpo <command> [args...]", "", "commands:"]
    for path, (_, help_text) in COMMANDS.items():
        lines.append(f"  {' '.join(path):<16} {help_text}")
    return "\n".join(lines)


def _skip_absent_tpu(environ=os.environ) -> None:
    """With the `tpu` extra installed (libtpu, which `mtgrpo plan` needs) on a machine with no TPU and no
    CUDA plugin, JAX would try the TPU backend first and libtpu would print metadata-server errors on
    every command before falling back to the CPU: go straight to the CPU. An explicit JAX_PLATFORMS wins;
    TPU VMs expose /dev/accel* (v4, v5p) or /dev/vfio/<n> (v5e, v6e)."""
    if "JAX_PLATFORMS" in environ or importlib.util.find_spec("libtpu") is None:
        return
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    if any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin")):
        return
    environ["JAX_PLATFORMS"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _skip_absent_tpu()
    for path, (target, _) in sorted(COMMANDS.items(), key=lambda kv: -len(kv[0])):
        if tuple(argv[: len(path)]) == path:
            module_name, func_name = target.split(":")
            func = getattr(importlib.import_module(module_name), func_name)
            prog = "mtgrpo " + " ".join(path)
            return int(func(argv[len(path) :], prog=prog) or 0)
    if argv and argv[0] not in ("-h", "--help"):
        print(f"mtgrpo: unknown command {' '.join(argv[:2])!r}\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    print(_usage())
    return 0


if __name__ == "__main__":
    sys.exit(main())
