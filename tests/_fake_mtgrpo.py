"""A stand-in for the `mtgrpo` command in the experiment runner's tests: `sft` and `train` resolve the config
exactly as the real ones do, write what the real ones write that the runner and the report read
(config.yaml, hf_sft/, metrics.jsonl, a checkpoint to resume from), but train nothing, so a whole
experiment takes a second.

Every invocation appends a JSON line to $FAKE_MTGRPO_LOG. $FAKE_MTGRPO_KILL = "<run dir suffix>:<step>"
makes that run, at that step, checkpoint and send SIGTERM to its parent (the runner), as a user pressing
Ctrl-C would; once (a flag file next to the log remembers it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

from mtgrpo_jax.config import save_config
from mtgrpo_jax.train.cli import resolve_config
from mtgrpo_jax.train.metrics import MetricsWriter

TASK_BASE = {"easy": 0.8, "mid": 0.4, "hard": 0.05}
METHOD_GAIN = {"grpo": 0.0, "dapo": 0.01, "mt_grpo": 0.02}


def accuracy(method: str, seed: int, task: str, step: int) -> float:
    """Deterministic synthetic eval accuracy, so tests can recompute what the report must say."""
    gain = METHOD_GAIN.get(method, 0.0) * (3.0 if task == "hard" else 1.0)
    return round(min(1.0, TASK_BASE.get(task, 0.3) + 0.01 * seed + gain * step), 6)


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _log(entry: dict) -> None:
    with open(os.environ["FAKE_MTGRPO_LOG"], "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--method")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(rest)
    cfg = resolve_config(args)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    if command == "sft":
        (out / "hf_sft").mkdir(exist_ok=True)
        # The "weights" depend on the seed and the SFT settings only, as a real warm start does.
        (out / "hf_sft" / "model.safetensors").write_text(f"seed={cfg.seed} sft={cfg.sft.model_dump()}")
        _log({"cmd": "sft", "seed": cfg.seed, "dir": str(out)})
        return 0

    warm = Path(cfg.model.path) if cfg.model.path else None
    ckpt = out / "fake_checkpoint.json"
    start = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
    _log(
        {
            "cmd": "train",
            "method": cfg.method,
            "seed": cfg.seed,
            "dir": str(out),
            "start": start,
            "warm_sha": _sha(warm) if warm else None,
            "sft_steps": cfg.sft.steps,
        }
    )
    kill = os.environ.get("FAKE_MTGRPO_KILL", "")
    flag = Path(os.environ["FAKE_MTGRPO_LOG"] + ".killed")
    names = [t.name for t in cfg.tasks]
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    with MetricsWriter(out, tensorboard=False, console=False, is_primary=True, resume_step=start if start else -1) as w:
        if start == 0:
            w.write(0, {"split": "eval", **{f"eval/{n}/accuracy": accuracy(cfg.method, cfg.seed, n, 0) for n in names}})
        for step in range(start + 1, cfg.train.steps + 1):
            rec = {f"task/{n}/zero_grad_rate": 0.5 for n in names}
            if cfg.weighting.kind != "uniform":
                rec.update({f"task/{n}/weight": (0.6 if n == "hard" else 0.2) for n in names})
            rec.update({f"task/{n}/share": (0.5 if n == "hard" else 0.25) for n in names})
            w.write(step, rec)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                w.write(
                    step,
                    {"split": "eval", **{f"eval/{n}/accuracy": accuracy(cfg.method, cfg.seed, n, step) for n in names}},
                )
            ckpt.write_text(json.dumps({"step": step}))
            if kill and str(out).endswith(kill.split(":")[0]) and step == int(kill.split(":")[1]) and not flag.exists():
                flag.write_text("")
                os.kill(os.getppid(), signal.SIGTERM)
                deadline = time.time() + 10
                while not stop["now"] and time.time() < deadline:
                    time.sleep(0.05)
            if stop["now"]:
                return 143
    (out / "hf_final").mkdir(exist_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
