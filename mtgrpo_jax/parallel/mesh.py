"""The device mesh: three named axes, `data` x `fsdp` x `tensor`.

- `data`: pure data parallelism (parameters replicated, batch split);
- `fsdp`: batch split *and* parameters/optimizer state split over one large dimension (ZeRO-3 style),
  gathered just-in-time by the compiler;
- `tensor`: Megatron-style tensor parallelism over attention heads, the MLP hidden size and the vocab.

Axis type: every axis is `jax.sharding.AxisType.Auto`. jax 0.10's `jax.make_mesh` defaults to
`Explicit` axes, where shardings become part of array types and every op whose output sharding is
ambiguous (a contraction over a sharded dim, a gather from a sharded table, `scan` carries, ...) needs an
explicit `out_sharding`. That would thread mesh knowledge through the decoder, the rollout engine and the
losses. With `Auto` axes the model stays mesh-agnostic: parameters get `NamedSharding`s from the
partition rules, the jitted entry points declare in/out shardings, a few `with_sharding_constraint`s pin
the activations (batch over ("data", "fsdp")), and the SPMD partitioner propagates the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension of activations is split over both


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all global devices, every process).

    One axis may be -1 to take whatever the others leave (default: fsdp). The product must equal the
    number of devices exactly, so a typo never silently idles part of a pod."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"mesh axis {name}={size!r} must be a positive int or -1")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {', '.join(free)}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if n % fixed:
            raise ValueError(f"mesh {_describe(sizes)} does not divide the {n} available devices")
        sizes[free[0]] = n // fixed
    if math.prod(sizes.values()) != n:
        raise ValueError(
            f"mesh {_describe(sizes)} = {math.prod(sizes.values())} devices does not match the {n} available devices"
        )
    shape = tuple(sizes[a] for a in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def _describe(sizes: dict[str, int]) -> str:
    return " x ".join(f"{k}={v}" for k, v in sizes.items())


def on_mesh(mesh: Mesh, fn):
    """`fn` (a jitted program) called with `mesh` active (`jax.set_mesh`), so what it traces sees the mesh:
    the model's activation sharding constraints and the splash-attention kernel's `shard_map` over the batch
    and head axes. (Without an active mesh a Pallas kernel is one unpartitionable call over the global
    arrays.)"""

    def call(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)

    call.__wrapped__ = fn
    return call
