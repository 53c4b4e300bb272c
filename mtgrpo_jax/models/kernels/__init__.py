"""Hand-written CPU kernels, compiled on first use, for the one place XLA:CPU is far off the hardware.

`decode_attention.cc` is the decode step's attention (prompt prefix + generated-cache blocks, masked
softmax, value sums) as an XLA FFI custom call for x86-64 CPUs with AVX2 and FMA. XLA:CPU runs that part
as thousands of tiny batched dots well below the memory bandwidth; the kernel streams each cache block
once. `mtgrpo bench rollout` measures the effect.

It is built with the machine's C++ compiler (`$CXX`, default `g++`) against jaxlib's FFI headers the first
time a decode step is traced on such a CPU, into `$MTGRPO_CACHE_DIR` (default `~/.cache/mtgrpo_jax`), keyed
by the source, the jaxlib version, the compiler and its flags; the build writes a temporary file and renames it, so
a concurrent or interrupted build never leaves a half-written library. Where there is no compiler, no
AVX2/FMA, or the build fails, `decode_attention()` returns None (with one warning) and the decode step
uses its XLA ops: the same math. `MTGRPO_CPU_KERNELS=0` turns the kernel off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = Path(__file__).with_name("decode_attention.cc")
_TARGET = "mtgrpo_decode_attention"
_FLAGS = ("-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC")


def _cpu_has_avx2_fma() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return {"avx2", "fma"} <= set(flags.split(":", 1)[-1].split())


def _build(compiler: str) -> Path:
    """The compiled library for this source, jaxlib and compiler: built once, then reused."""
    import jaxlib

    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    identity = [_SOURCE.read_bytes(), jaxlib.__version__.encode(), version.encode(), " ".join(_FLAGS).encode()]
    key = hashlib.sha256(b"\0".join(identity)).hexdigest()[:16]
    root = Path(os.environ.get("MTGRPO_CACHE_DIR") or Path.home() / ".cache" / "mtgrpo_jax")
    out = root / "kernels" / f"decode_attention-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


@functools.cache
def _load() -> bool:
    """Builds and registers the kernel once per process; False (with one warning) where it cannot."""
    if os.environ.get("MTGRPO_CPU_KERNELS", "1") == "0" or not _cpu_has_avx2_fma():
        return False
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        warnings.warn("no C++ compiler ($CXX or g++): the decode step's attention uses XLA ops", stacklevel=3)
        return False
    try:
        library = ctypes.CDLL(str(_build(compiler)))
        jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(library.MtgrpoDecodeAttention), platform="cpu")
    except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(f"decode attention kernel unavailable, using XLA ops: {err}", stacklevel=3)
        return False
    return True


def available() -> bool:
    """Whether `decode_attention` runs the kernel here (CPU backend, x86-64 with AVX2 and FMA, built)."""
    return jax.default_backend() == "cpu" and _load()


def decode_attention(q, k_prefix, v_prefix, prefix_mask, slot, k_blocks, v_blocks, scale: float):
    """softmax(scale * q k^T) v over a prompt's prefix slots (where `prefix_mask`) and generated slots
    0..`slot`, as `decode.step` computes it (shapes there: q `[Bp, Hkv, n, G, D]`, prefix k `[Bp, Hkv, D,
    P]`, v `[Bp, Hkv, P, D]`, mask `[Bp, P]`, blocks k `[Bp, Hkv, n, D, C_j]`, v `[Bp, Hkv, n, C_j, D]`).
    float32 `[Bp, Hkv, n, G, D]`, or None where the kernel is not available."""
    if not available():
        return None
    operands = [q, k_prefix, v_prefix, prefix_mask.astype(jnp.bool_), jnp.asarray(slot, jnp.int32)]
    for k, v in zip(k_blocks, v_blocks, strict=True):
        operands += [k, v]
    if any(x.dtype != jnp.float32 for i, x in enumerate(operands) if i not in (3, 4)):
        return None
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(*operands, scale=np.float32(scale))
