"""The `mtgrpo` entry point's platform default: no TPU backend attempt on a machine without a TPU."""

import importlib.util

from mtgrpo_jax import cli


def _machine(monkeypatch, *, modules=(), devices=()):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name in modules else None)
    monkeypatch.setattr(
        cli.glob, "glob", lambda pattern: [d for d in devices if d.startswith(pattern.split("*")[0].split("[")[0])]
    )


def test_libtpu_without_a_tpu_goes_to_cpu(monkeypatch):
    _machine(monkeypatch, modules={"libtpu"})
    env = {}
    cli._skip_absent_tpu(env)
    assert env == {"JAX_PLATFORMS": "cpu"}


def test_tpu_vm_gpu_host_and_explicit_choice_are_left_alone(monkeypatch):
    for devices in (["/dev/accel0"], ["/dev/vfio/0"]):
        _machine(monkeypatch, modules={"libtpu"}, devices=devices)
        env = {}
        cli._skip_absent_tpu(env)
        assert env == {}, devices
    _machine(monkeypatch, modules={"libtpu", "jax_cuda12_plugin"})
    env = {}
    cli._skip_absent_tpu(env)
    assert env == {}
    _machine(monkeypatch, modules={"libtpu"})
    env = {"JAX_PLATFORMS": "tpu"}
    cli._skip_absent_tpu(env)
    assert env == {"JAX_PLATFORMS": "tpu"}
    _machine(monkeypatch)  # no libtpu: JAX's own default is quiet
    env = {}
    cli._skip_absent_tpu(env)
    assert env == {}
