"""The launch scripts: every one parses, and launch/local_multiprocess.sh starts N processes that really
join one jax.distributed job (checked with a stub program in place of `mtgrpo`), passes the config and
overrides through, and stops the others when one fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
LOCAL = LAUNCH / "local_multiprocess.sh"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))

# Stands in for `mtgrpo`: called as `STUB train --config CONFIG key=value ...`; joins the job the way the
# trainer does, runs one cross-process collective, and reports what it saw into the directory CONFIG.
STUB = """
import json, os, sys
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from mtgrpo_jax.parallel import initialize_distributed

joined = initialize_distributed()
gathered = multihost_utils.process_allgather(np.int32(jax.process_index()))
out = Path(sys.argv[3])
report = {
    "argv": sys.argv[1:],
    "joined": joined,
    "process_index": jax.process_index(),
    "process_count": jax.process_count(),
    "local_devices": jax.local_device_count(),
    "devices": jax.device_count(),
    "gathered": np.asarray(gathered).tolist(),
    "env": {k: v for k, v in os.environ.items() if k.startswith(("JAX_", "MTGRPO_"))},
}
(out / f"process_{jax.process_index()}.json").write_text(json.dumps(report))
"""

# Process 1 fails at once; process 0 would otherwise sit here for a minute.
FAILING_STUB = """
import os, sys, time
if os.environ["JAX_PROCESS_ID"] == "1":
    sys.exit(3)
time.sleep(60)
"""


def _env(**extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "MTGRPO_", "SLURM_"))
    }
    env.update(extra)
    return env


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_local_multiprocess_joins_one_job(tmp_path):
    stub = tmp_path / "stub.py"
    stub.write_text(STUB)
    out = tmp_path / "out"
    out.mkdir()
    # The suite's XLA_FLAGS asks for 8 devices; the launcher's -d must win.
    env = _env(MTGRPO_CMD=f"{sys.executable} {stub}", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        ["bash", str(LOCAL), "-n", "2", "-d", "2", "-l", str(tmp_path / "logs"), str(out), "a.b=1", "c=x y"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reports = [json.loads((out / f"process_{i}.json").read_text()) for i in range(2)]
    for i, r in enumerate(reports):
        assert r["joined"] is True
        assert (r["process_index"], r["process_count"]) == (i, 2)
        assert (r["local_devices"], r["devices"]) == (2, 4)
        assert r["gathered"] == [0, 1]  # a collective across both processes went through
        assert r["argv"] == ["train", "--config", str(out), "a.b=1", "c=x y"]
        assert r["env"]["JAX_PROCESS_ID"] == str(i) and r["env"]["JAX_NUM_PROCESSES"] == "2"
        assert r["env"]["JAX_COORDINATOR_ADDRESS"].startswith("localhost:")
        assert not [k for k in r["env"] if k.startswith("MTGRPO_") and k != "MTGRPO_CMD"]  # JAX_* names only
    assert reports[0]["env"]["JAX_COORDINATOR_ADDRESS"] == reports[1]["env"]["JAX_COORDINATOR_ADDRESS"]
    assert (tmp_path / "logs" / "process_1.log").is_file()


def test_local_multiprocess_stops_the_rest_when_one_fails(tmp_path):
    stub = tmp_path / "failing.py"
    stub.write_text(FAILING_STUB)
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", str(LOCAL), "-n", "2", "-d", "1", "-l", str(tmp_path / "logs"), "cfg.yaml"],
        cwd=ROOT,
        env=_env(MTGRPO_CMD=f"{sys.executable} {stub}"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    assert "process 1 exited with status 3" in proc.stderr
    assert time.monotonic() - t0 < 30  # process 0 was stopped, not waited for


@pytest.mark.parametrize(
    "args, needle", [(["-n", "0", "c.yaml"], "num_processes must be a positive integer"), ([], "missing CONFIG")]
)
def test_local_multiprocess_refuses_bad_arguments(args, needle):
    proc = subprocess.run(["bash", str(LOCAL), *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
