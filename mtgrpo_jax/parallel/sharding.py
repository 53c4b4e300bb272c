"""Partition rules: logical parameter axes -> mesh axes, in two layouts.

Every parameter of `mtgrpo_jax.models.Transformer` carries `logical_axes` metadata, e.g. q_proj is
("layers", "embed", "heads", "head_dim"). A layout maps logical names to mesh axes:

- "train": FSDP over the model dimension ("embed") of every matrix, tensor parallel over heads,
  kv heads, MLP hidden and vocab. Parameters and optimizer state are split over fsdp x tensor.
- "serve": tensor parallel only; replicated over data and fsdp, so a decode loop never all-gathers
  FSDP shards once per token. Reshard train -> serve before rollout and drop the copy afterwards.

A dimension that its mesh axes do not divide (e.g. 2 kv heads on tensor=4) stays replicated rather than
failing: correctness first, and such small dims are cheap to replicate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mtgrpo_jax.parallel.mesh import BATCH_AXES

LAYOUTS: dict[str, dict[str, str | tuple[str, ...]]] = {
    "train": {"embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"},
    "serve": {"heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"},
}


def divisible_spec(
    shape: Sequence[int], dim_axes: Sequence[str | Sequence[str] | None], axis_sizes: Mapping[str, int]
) -> P:
    """The one rule for placing an array on a mesh: dimension i goes over the mesh axes `dim_axes[i]` (a
    name, a tuple of names or None) when their product divides it, and stays replicated otherwise (e.g. 2
    kv heads on tensor=4, or a batch of 1 in a decode step): odd shapes keep working instead of failing on
    a divisibility error, and such small dimensions are cheap to replicate. Axes of size 1, axes the mesh
    lacks and axes an earlier dimension already uses are dropped."""
    used: set[str] = set()
    spec = []
    for dim, axes in zip(shape, dim_axes):
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        axes = tuple(a for a in axes if axis_sizes.get(a, 1) > 1 and a not in used)
        if axes and dim % math.prod(axis_sizes[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return P(*spec)


def mesh_axis_sizes(mesh) -> dict[str, int]:
    """{axis name: size} of a concrete or abstract mesh."""
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def logical_to_spec(
    logical_axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, layout: str = "train"
) -> P:
    """PartitionSpec for one array with the given logical axes under `layout` on `mesh`."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown sharding layout {layout!r} (known: {', '.join(LAYOUTS)})")
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {logical_axes} do not match shape {shape}")
    rules = LAYOUTS[layout]
    return divisible_spec(shape, [rules.get(name) if name else None for name in logical_axes], mesh_axis_sizes(mesh))


def _variable_spec(var: nnx.Variable, mesh: Mesh, layout: str) -> P:
    value = var.get_value()
    axes = var.get_metadata().get("logical_axes")
    if axes is None:  # unannotated variables (e.g. RNG counters) are replicated
        return P()
    return logical_to_spec(tuple(axes), tuple(value.shape), mesh, layout)


def state_shardings(state: nnx.State, mesh: Mesh, layout: str = "train") -> nnx.State:
    """NamedSharding for every leaf of an nnx State (same pytree structure), e.g. for jit in_shardings."""
    return jax.tree.map(
        lambda var: var.copy(NamedSharding(mesh, _variable_spec(var, mesh, layout))),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def shard_state(state: nnx.State, mesh: Mesh, layout: str = "train") -> nnx.State:
    """Moves/reshards every array of `state` into `layout` (works from any current sharding)."""
    shardings = state_shardings(state, mesh, layout)
    return jax.tree.map(lambda x, s: _put(x, s), state, shardings)


def shard_model(model: nnx.Module, mesh: Mesh, layout: str = "train") -> nnx.Module:
    """Reshards `model`'s parameters in place into `layout` and returns it."""
    nnx.update(model, shard_state(nnx.state(model), mesh, layout))
    return model


def _put(x: jax.Array, sharding: NamedSharding) -> jax.Array:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.jit(lambda a: a, out_shardings=sharding)(x)  # global -> global reshard
    if jax.process_count() > 1:
        # a host-local value that every process holds in full: each process supplies its own shards
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
    return jax.device_put(x, sharding)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Activations/inputs: leading (batch) dim over ("data", "fsdp"), the rest replicated. The default
    spec names the leading dim only, so it serves arrays of any rank (a training batch's pytree)."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))
