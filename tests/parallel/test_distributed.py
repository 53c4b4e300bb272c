"""jax.distributed initialisation: launch-mode resolution, and two real processes on localhost."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from mtgrpo_jax.models import ModelConfig, Transformer, save_pretrained
from mtgrpo_jax.parallel import initialize_distributed
from mtgrpo_jax.parallel.distributed import expand_first_host, resolve_distributed


def test_single_process_is_a_no_op(monkeypatch):
    for var in (
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "JAX_PROCESS_ID",
        "SLURM_JOB_ID",
        "TPU_WORKER_HOSTNAMES",
        "MEGASCALE_COORDINATOR_ADDRESS",
    ):
        monkeypatch.delenv(var, raising=False)
    assert initialize_distributed() is False
    assert initialize_distributed(num_processes=1) is False


def test_resolve_launch_modes():
    assert resolve_distributed(env={}) is None
    assert resolve_distributed("10.0.0.1:1234", 4, 2, env={}) == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 4,
        "process_id": 2,
    }
    env = {"JAX_COORDINATOR_ADDRESS": "host0:99", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert resolve_distributed(env=env) == {"coordinator_address": "host0:99", "num_processes": 2, "process_id": 1}
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "8",
        "SLURM_PROCID": "5",
        "SLURM_STEP_NODELIST": "gpu-node[07-10,12]",
    }
    assert resolve_distributed(env=slurm) == {
        "coordinator_address": "gpu-node07:12597",
        "num_processes": 8,
        "process_id": 5,
    }
    assert resolve_distributed(env={**slurm, "SLURM_NTASKS": "1"}) is None  # one task: nothing to join
    assert resolve_distributed(env={"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == {}  # TPU pod: auto-detect
    assert resolve_distributed(env={"TPU_WORKER_HOSTNAMES": "t0"}) is None  # single-host TPU VM
    ompi = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911", "OMPI_COMM_WORLD_SIZE": "4"}
    assert resolve_distributed(env=ompi) == {}  # mpirun: jax reads the ORTE URI itself
    assert resolve_distributed(env={**ompi, "OMPI_COMM_WORLD_SIZE": "1"}) is None
    assert expand_first_host("a1,b2") == "a1" and expand_first_host("n[3,5-6]") == "n3"
    with pytest.raises(ValueError, match="missing process_id"):
        resolve_distributed("h:1", 2, env={})
    with pytest.raises(ValueError, match="process_id 2 is outside"):
        resolve_distributed("h:1", 2, 2, env={})


@pytest.mark.slow
def test_two_processes_sharded_forward(tmp_path):
    """Two processes x 4 fake CPU devices join with jax.distributed, each loads only its shards of a
    checkpoint into the data 2 x fsdp 2 x tensor 2 mesh, run one sharded forward, gather the logits and
    save the model back collectively; all of it must match the single-process results."""
    cfg = ModelConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = Transformer(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    ckpt = tmp_path / "ckpt"
    save_pretrained(model, ckpt)
    ids = np.random.RandomState(0).randint(1, 96, size=(4, 8)).astype(np.int32)
    mask = np.ones((4, 8), bool)
    mask[0, :3] = False
    np.savez(tmp_path / "inputs.npz", ids=ids, mask=mask)
    reference = np.asarray(nnx.jit(lambda m, i, a: m(i, attention_mask=a))(model, jnp.asarray(ids), jnp.asarray(mask)))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).with_name("_two_process_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = tmp_path / "logits.npy"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(worker),
                f"127.0.0.1:{port}",
                str(i),
                str(ckpt),
                str(tmp_path / "inputs.npz"),
                str(out),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    logits = np.load(out)
    np.testing.assert_allclose(logits[mask], reference[mask], atol=1e-5)
    original, resaved = load_file(ckpt / "model.safetensors"), load_file(str(out) + ".resaved/model.safetensors")
    assert original.keys() == resaved.keys() and all(np.array_equal(original[k], resaved[k]) for k in original)
