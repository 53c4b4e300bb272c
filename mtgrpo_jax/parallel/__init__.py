"""Meshes (data, fsdp, tensor), parameter partition rules ("train" / "serve" layouts) and
multi-process initialisation. See `mesh.py` for the axis-type choice (Auto)."""

from mtgrpo_jax.parallel.distributed import host_to_global, initialize_distributed, to_host
from mtgrpo_jax.parallel.mesh import AXES, BATCH_AXES, make_mesh
from mtgrpo_jax.parallel.sharding import (
    LAYOUTS,
    batch_sharding,
    divisible_spec,
    logical_to_spec,
    mesh_axis_sizes,
    shard_model,
    shard_state,
    state_shardings,
)

__all__ = [
    "AXES",
    "BATCH_AXES",
    "LAYOUTS",
    "make_mesh",
    "divisible_spec",
    "mesh_axis_sizes",
    "logical_to_spec",
    "state_shardings",
    "shard_state",
    "shard_model",
    "batch_sharding",
    "initialize_distributed",
    "to_host",
    "host_to_global",
]
