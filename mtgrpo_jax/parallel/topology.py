"""TPU slices by name, for compiling ahead of time on a machine without a TPU.

libtpu (the optional `tpu` extra) compiles for a named slice from any host:
`jax.experimental.topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")` gives the
slice's devices, and a program lowered with shardings over them compiles exactly as it would on the
pod. libtpu understands only its own names (`v5p:2x2x1`); users rent Cloud names (`v5p-8`), which count
TensorCores for v4 and v5p (two per chip: `v5p-8` is 4 chips) and chips for v5e and v6e (`v6e-8` is 8
chips). `resolve_topology` maps either spelling to the libtpu name and the chip's published figures.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures. `hbm_bytes` is the HBM a program may use as libtpu 0.0.42.1's compiler reports
    it ("exceeds available HBM (95.74G)"), so "fits" here means "the compiler accepts it". The peak bf16
    FLOP/s and HBM bandwidth are Google's published per-chip numbers (Cloud TPU system architecture)."""

    generation: str
    hbm_bytes: int
    peak_flops: float  # bf16 dense FLOP/s
    hbm_bandwidth: float  # bytes/s
    cores_per_chip_in_name: int  # Cloud names count TensorCores (2 per chip) for v4 / v5p
    dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)


_GIB = 2**30
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", int(15.25 * _GIB), 275e12, 1228e9, 2, 3),
    "v5e": Chip("v5e", int(15.75 * _GIB), 197e12, 819e9, 1, 2),
    "v5p": Chip("v5p", int(95.74 * _GIB), 459e12, 2765e9, 2, 3),
    "v6e": Chip("v6e", int(31.25 * _GIB), 918e12, 1640e9, 1, 2),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}


class TopologyError(ValueError):
    """A topology name that is not a TPU slice we know; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as the user wrote it
    libtpu_name: str  # e.g. "v5p:2x2x1"
    chip: Chip
    shape: tuple[int, ...]

    @property
    def num_chips(self) -> int:
        return math.prod(self.shape)


def _shape_for(chips: int, dims: int) -> tuple[int, ...]:
    """The slice shape Cloud gives a chip count: 2-D 1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16; 3-D 2x2x1,
    then doubling z, y, x in turn from 2x2x2 (2x2x4, 2x4x4, 4x4x4, 4x4x8, ...)."""
    if dims == 2:
        if chips == 1:
            return (1, 1)
        shape = [1, 1]
        while math.prod(shape) < chips:
            i = 0 if shape[0] < shape[1] else 1
            shape[i] *= 2
        return tuple(shape) if math.prod(shape) == chips else ()
    if chips == 4:
        return (2, 2, 1)
    shape = [2, 2, 2]
    axis = 2
    while math.prod(shape) < chips:
        shape[axis] *= 2
        axis = (axis - 1) % 3
    return tuple(shape) if math.prod(shape) == chips else ()


def resolve_topology(name: str) -> Topology:
    """`v5p-8`, `v5litepod-4`, `v6e-8` (Cloud) or `v5p:2x2x1`, `v6e:2x4` (libtpu) -> Topology."""
    text = str(name).strip().lower()
    known = ", ".join(sorted(CHIPS))
    m = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+){1,2})", text)
    if m:
        gen = _ALIASES.get(m.group(1), m.group(1))
        if gen not in CHIPS:
            raise TopologyError(f"topology {name!r}: unknown TPU generation {m.group(1)!r} (known: {known})")
        chip = CHIPS[gen]
        shape = tuple(int(x) for x in m.group(2).split("x"))
        if len(shape) != chip.dims or min(shape) < 1:
            raise TopologyError(
                f"topology {name!r}: a {gen} slice is {chip.dims}-D, e.g. "
                f"{gen}:{'x'.join(map(str, _shape_for(4, chip.dims)))}"
            )
        return Topology(name, f"{gen}:{'x'.join(map(str, shape))}", chip, shape)
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", text)
    if not m:
        raise TopologyError(
            f"topology {name!r}: expected a Cloud name like v5p-8 / v6e-8 / v5litepod-4 or a libtpu "
            f"name like v5p:2x2x1 / v6e:2x4"
        )
    gen = _ALIASES.get(m.group(1), m.group(1))
    if gen not in CHIPS:
        raise TopologyError(f"topology {name!r}: unknown TPU generation {m.group(1)!r} (known: {known})")
    chip = CHIPS[gen]
    count = int(m.group(2))
    if count % chip.cores_per_chip_in_name:
        raise TopologyError(f"topology {name!r}: {gen} Cloud names count TensorCores, two per chip (e.g. {gen}-8)")
    chips = count // chip.cores_per_chip_in_name
    shape = _shape_for(chips, chip.dims) if chips > 0 else ()
    if not shape:
        unit = "TensorCores" if chip.cores_per_chip_in_name > 1 else "chips"
        sizes = [math.prod(_shape_for(c, chip.dims)) * chip.cores_per_chip_in_name for c in (4, 8, 16, 32)]
        raise TopologyError(
            f"topology {name!r}: no {gen} slice has {count} {unit} (e.g. {', '.join(f'{gen}-{s}' for s in sizes)})"
        )
    return Topology(name, f"{gen}:{'x'.join(map(str, shape))}", chip, shape)


def topology_devices(topology: Topology):
    """The slice's devices as libtpu describes them (compile-only: nothing runs on them)."""
    try:
        from jax.experimental import topologies
    except ImportError as err:  # pragma: no cover - jax always has it
        raise TopologyError(f"topology {topology.name!r}: jax.experimental.topologies is missing ({err})") from None
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise TopologyError(
            f"topology {topology.name!r}: compiling for TPU needs libtpu; install the tpu extra "
            f"(pip install -c constraints.txt -e '.[tpu]')"
        ) from None
    # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) for the process that drives the TPUs; a
    # compile-only client drives none, so several planners (and test workers) may load it at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.libtpu_name)
    except Exception as err:  # libtpu's errors are long multi-line status strings
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TopologyError(
            f"topology {topology.name!r} ({topology.libtpu_name}): libtpu refused it: {first}"
        ) from None
    devices = list(desc.devices)
    if len(devices) != topology.num_chips:
        raise TopologyError(
            f"topology {topology.name!r}: libtpu gave {len(devices)} devices for "
            f"{topology.libtpu_name}, expected {topology.num_chips}"
        )
    return devices
