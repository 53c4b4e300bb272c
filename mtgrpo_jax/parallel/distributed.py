"""`jax.distributed` initialisation: only what `jax.distributed.initialize()` does not do itself.

JAX detects Cloud TPU pods, Open MPI (`mpirun`) and SLURM `srun` steps on its own; this module adds
(1) a no-op for a single process, so every entry point can call it unconditionally (JAX would raise
for want of a coordinator); (2) the explicit mode from JAX_NUM_PROCESSES / JAX_PROCESS_ID (JAX reads
only JAX_COORDINATOR_ADDRESS), as launch/local_multiprocess.sh and launch/slurm_gpu.sbatch set them;
(3) SLURM without a full `srun` environment or with one task: the first node of SLURM_STEP_NODELIST
or SLURM_JOB_NODELIST, port 12355 + job id % 1000 (MTGRPO_COORDINATOR_PORT overrides), and nothing
to join for a single task. It must run before anything touches a JAX backend (jax.devices(), arrays).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

DEFAULT_PORT = 12355


def expand_first_host(nodelist: str) -> str:
    """First host of a SLURM node list: "gpu[03-05,9],cpu1" -> "gpu03"."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def resolve_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
) -> dict | None:
    """What `initialize_distributed` would pass to `jax.distributed.initialize` (None: single process,
    {}: let JAX auto-detect, as on TPU pods). Pure, so the launch modes can be tested without a cluster."""
    env = os.environ if env is None else env
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])

    if coordinator_address or num_processes is not None or process_id is not None:
        if num_processes == 1 and not coordinator_address:
            return None
        missing = [
            n
            for n, v in (
                ("coordinator_address", coordinator_address),
                ("num_processes", num_processes),
                ("process_id", process_id),
            )
            if v is None
        ]
        if missing:
            raise ValueError(
                f"explicit distributed init needs coordinator_address, num_processes and process_id; "
                f"missing {', '.join(missing)}"
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id {process_id} is outside [0, num_processes={num_processes})")
        return {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}

    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise ValueError("SLURM job with several tasks but no SLURM_STEP_NODELIST / SLURM_JOB_NODELIST")
        port = int(env.get("MTGRPO_COORDINATOR_PORT", DEFAULT_PORT + int(env["SLURM_JOB_ID"]) % 1000))
        return {
            "coordinator_address": f"{expand_first_host(nodelist)}:{port}",
            "num_processes": int(env["SLURM_NTASKS"]),
            "process_id": int(env["SLURM_PROCID"]),
        }

    # Clusters jax.distributed.initialize() reads itself: a TPU pod slice (from the TPU metadata server) and
    # Open MPI (from the ORTE URI); one host or one rank has nothing to join.
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return {}
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return {}
    return None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
) -> bool:
    """Joins this process to the job; returns True when `jax.distributed` was (or already is) initialised."""
    if jax.distributed.is_initialized():
        return True
    kwargs = resolve_distributed(coordinator_address, num_processes, process_id)
    if kwargs is None:
        return False
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    jax.distributed.initialize(**kwargs)
    return True


def to_host(tree: Any) -> Any:
    """NumPy copies of a pytree of arrays, whatever their sharding.

    `jax.device_get` refuses an array sharded over devices of other processes; those are gathered with
    `process_allgather` (a collective: in a multi-process run every process must make the same call,
    which holds wherever all processes run the same program on the same shardings). Fully addressable
    and fully replicated arrays are read locally, so a single process pays nothing extra."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def host_to_global(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Places a pytree of host values that every process holds in full (and identically) into `sharding`.

    Each process supplies only its own shards (`make_array_from_callback`): no cross-process traffic and
    no equality check, unlike `jax.device_put`, which all-gathers a host value placed into a sharding
    spanning several processes to assert it is the same everywhere. A single process uses `device_put`."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def one(x):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree)
