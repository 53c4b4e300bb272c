"""Two processes x 4 fake CPU devices, joined by jax.distributed over localhost, train exactly like one
process with 8 devices: same metrics, same final parameters, same checkpointed host state.

Both runs start from the same warm-started model (a short supervised warm start written to disk first),
so the random-init policy earns some format rewards and the step is not degenerate: groups survive the
filter, the update has a gradient and the task weights move. Starting both from that one model keeps the
comparison tight: the only difference left between the runs is the order in which the CPU collectives
sum across devices (XLA's in-process all-reduce against gloo between processes), rounding-level.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from test_trainer import stable, tiny_overrides

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "methods" / "mt_grpo.yaml"
# The lenient filter keeps groups with mixed rewards (format reward 0.1 vs 0), which the warm-started tiny
# model produces; the strict one would need correct answers, which it does not.
RL = {"mesh.fsdp": -1, "sampler.filter": "lenient"}
RTOL, ATOL = 1e-4, 1e-5


def _env(devices: int | None) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_"))
    }
    env.update(PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _run(cmd: list[str], env: dict, what: str) -> None:
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900
    )
    assert proc.returncode == 0, f"{what} failed:\n{proc.stdout[-6000:]}"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mtgrpo_jax.cli", *args]


def _metrics(run: Path) -> list[dict]:
    return [stable(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _params(directory: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_close(a, b, where: str) -> None:
    """Equal structure and discrete values; floats equal to rounding."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ: {set(a) ^ set(b)}"
        for k in a:
            _assert_close(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert np.isclose(a, b, rtol=RTOL, atol=1e-6), f"{where}: {a} != {b}"
    else:
        assert a == b and type(a) is type(b), f"{where}: {a!r} != {b!r}"


def test_two_processes_train_like_one(tmp_path):
    # 1. One warm-started model both runs start from.
    warm = tmp_path / "warm"
    sft = {
        "sft.steps": 40,
        "sft.learning_rate": 0.01,
        "sft.batch_size": 16,
        "sft.demonstration_style": "answer",
        "mesh.fsdp": -1,
    }
    _run(_cli("sft", "--config", str(CONFIG), *tiny_overrides(warm, tmp_path / "data_1", **sft)), _env(8), "warm start")
    start = {"model.init": "pretrained", "model.path": str(warm / "hf_sft"), **RL}

    # 2. One process, 8 devices.
    single = tmp_path / "single"
    _run(
        _cli("train", "--config", str(CONFIG), *tiny_overrides(single, tmp_path / "data_1", **start)),
        _env(8),
        "single-process run",
    )

    # 3. Two processes x 4 devices through the local launcher, generating their data afresh (process 0
    #    writes the cache, process 1 waits and reads it).
    multi = tmp_path / "multi"
    env = _env(None)
    env["MTGRPO_CMD"] = f"{sys.executable} -m mtgrpo_jax.cli"
    _run(
        [
            "bash",
            str(ROOT / "launch" / "local_multiprocess.sh"),
            "-n",
            "2",
            "-d",
            "4",
            "-l",
            str(tmp_path / "logs"),
            str(CONFIG),
            *tiny_overrides(multi, tmp_path / "data_2", **start),
        ],
        env,
        "two-process run",
    )

    # The run really was two cooperating processes: each wrote its own shards into the checkpoint.
    shards = {p.name for p in (multi / "checkpoints" / "2" / "arrays").rglob("*process_*")}
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= shards, shards

    # Metrics (process 0 alone writes them): the same records, discrete values equal, floats to rounding.
    ms, mm = _metrics(single), _metrics(multi)
    assert [r["step"] for r in ms] == [0, 1, 2, 2]  # eval, 2 steps, eval
    _assert_close(ms, mm, "metrics")
    steps = [r for r in ms if "train/loss" in r]
    assert len(steps) == 2
    for r in steps:  # not a degenerate step: some groups survived, the update had a gradient
        assert r["sampler/groups_kept"] > 0 and r["train/valid_rows"] > 0 and r["train/grad_norm"] > 0
    assert any(abs(r[f"task/{t}/improvement"]) > 1e-3 for r in steps for t in ("arc", "countdown"))
    assert steps[-1]["task/arc/next_weight"] != 0.5

    # Final parameters (gathered and written by process 0): equal to rounding, and they did move.
    ps, pm, p0 = _params(single / "hf_final"), _params(multi / "hf_final"), _params(warm / "hf_sft")
    assert ps.keys() == pm.keys() == p0.keys() and ps
    for k in ps:
        np.testing.assert_allclose(pm[k], ps[k], rtol=RTOL, atol=ATOL, err_msg=k)
    moved = max(float(np.max(np.abs(ps[k] - p0[k]))) for k in ps)
    assert moved > 5e-4, moved  # Adam moves a parameter by about the learning rate (1e-3) per step

    # The checkpointed host state (sampler, data streams, weights) a resumed run would continue from.
    def host(run: Path) -> dict:
        state = json.loads((run / "checkpoints" / "2" / "host" / "metadata").read_text())
        state.pop("history")
        return state

    _assert_close(host(single), host(multi), "host state")
