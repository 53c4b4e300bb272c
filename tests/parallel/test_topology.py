"""TPU slice names: Cloud names (TensorCores for v4/v5p, chips for v5e/v6e) and libtpu names."""

import pytest

from mtgrpo_jax.parallel.topology import CHIPS, TopologyError, resolve_topology, topology_devices


@pytest.mark.parametrize(
    "name, libtpu, chips",
    [
        ("v5p-8", "v5p:2x2x1", 4),
        ("v5p-16", "v5p:2x2x2", 8),
        ("v5p-32", "v5p:2x2x4", 16),
        ("v5p-128", "v5p:4x4x4", 64),
        ("v4-8", "v4:2x2x1", 4),
        ("v4-32", "v4:2x2x4", 16),
        ("v6e-8", "v6e:2x4", 8),
        ("v6e-4", "v6e:2x2", 4),
        ("v6e-256", "v6e:16x16", 256),
        ("v5e-4", "v5e:2x2", 4),
        ("v5litepod-4", "v5e:2x2", 4),
        ("v5litepod-16", "v5e:4x4", 16),
        ("V5P-8", "v5p:2x2x1", 4),
        ("v5p:2x2x1", "v5p:2x2x1", 4),
        ("v6e:2x4", "v6e:2x4", 8),
        ("v5e:2x2", "v5e:2x2", 4),
    ],
)
def test_names_map_to_libtpu_slices(name, libtpu, chips):
    t = resolve_topology(name)
    assert (t.libtpu_name, t.num_chips) == (libtpu, chips)
    assert t.chip is CHIPS[libtpu.split(":")[0]]


@pytest.mark.parametrize(
    "name, words",
    [
        ("v5p-6", "no v5p slice has 6 TensorCores"),
        ("v5p-7", "TensorCores, two per chip"),
        ("v6e-3", "no v6e slice has 3 chips"),
        ("v7x-8", "unknown TPU generation"),
        ("tpu-please", "expected a Cloud name"),
        ("v6e:2x2x2", "2-D"),
        ("v5p:2x2", "3-D"),
    ],
)
def test_bad_names_are_one_line_errors(name, words):
    with pytest.raises(TopologyError) as err:
        resolve_topology(name)
    assert words in str(err.value) and "\n" not in str(err.value) and repr(name) in str(err.value)


def test_libtpu_gives_the_slices_devices():
    pytest.importorskip("libtpu")
    devices = topology_devices(resolve_topology("v5p-16"))
    assert len(devices) == 8 and devices[0].platform == "tpu" and "v5" in devices[0].device_kind.lower()
