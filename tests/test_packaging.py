"""A wheel built from the repository carries what an installed `mtgrpo` needs at run time: the method
presets behind `--method`, the bundled tiny model config and tokenizer."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_method_presets_and_assets(tmp_path):
    # Build from a copy, so the build's egg-info and build/ folders never land in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "mtgrpo_jax", src / "mtgrpo_jax", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "wheel"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = out.glob("mtgrpo_jax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    presets = sorted(p.name for p in (ROOT / "mtgrpo_jax" / "presets" / "methods").glob("*.yaml"))
    assert {"mt_grpo.yaml", "dapo.yaml", "grpo.yaml"} <= set(presets)
    for preset in presets:
        assert f"mtgrpo_jax/presets/methods/{preset}" in names
    for asset in (
        "assets/tiny_model/config.json",
        "assets/tiny_tokenizer/tokenizer.json",
        "models/kernels/decode_attention.cc",
    ):
        assert f"mtgrpo_jax/{asset}" in names


def test_method_presets_resolve_from_the_package_and_the_repo():
    from mtgrpo_jax.config import load_config
    from mtgrpo_jax.train.cli import METHODS_DIR

    assert METHODS_DIR.parent.parent == ROOT / "mtgrpo_jax"
    dapo = load_config(None, [], [METHODS_DIR / "dapo.yaml"])
    assert load_config(None, [], [ROOT / "configs" / "methods" / "dapo.yaml"]) == dapo
    # the repo's configs name the shipped presets as their base
    assert load_config(ROOT / "configs" / "demo.yaml").weighting.kind == "mt_grpo"
    assert load_config(ROOT / "configs" / "paper" / "exp1.yaml").sampler.kind == "ratio_preserving"
