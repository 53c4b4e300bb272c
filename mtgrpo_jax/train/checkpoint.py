"""Checkpoints with orbax: device arrays (parameters, optimizer and task-weight state) plus a JSON record
of the host state (step, sampler and data-stream states, metric history).

Orbax writes each step into a temporary directory and renames it only once everything is on disk, so a
checkpoint is complete or absent, never half-written; `latest_step` only sees finished ones. A finished one
can still go bad afterwards (a failing disk, a half-synced bucket): `restore_latest` then falls back to the
newest checkpoint that reads back and renames the bad one aside (`STEP.unreadable`), never deleting it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        self._manager.reload()
        return self._manager.latest_step()

    def save(self, step: int, arrays: Any, host_state: dict) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), host=ocp.args.JsonSave(host_state)),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """Restores into the structure, dtypes and shardings of `like` (a pytree of arrays)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore()),
        )
        return out["arrays"], dict(out["host"])

    def restore_latest(self, like: Any, log=print) -> tuple[int, Any, dict] | None:
        """(step, arrays, host state) of the newest checkpoint that reads back, or None when none does.

        Each newer one that fails to read is renamed to `STEP.unreadable` (orbax no longer counts it as a
        step) and reported in one line. Only process 0 renames; every process tries the same steps in order."""
        self._manager.reload()
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                arrays, host = self.restore(step, like)
            except Exception as e:  # noqa: BLE001 (orbax/tensorstore raise many kinds for a damaged file)
                reason = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
                reason = f"{type(e).__name__}: {reason}"[:300]
                aside = self._set_aside(step)
                log(
                    f"[mtgrpo] checkpoint step {step} could not be read ({reason}); moved to {aside}, "
                    "trying the previous one"
                )
                continue
            return step, arrays, host
        return None

    def _set_aside(self, step: int) -> Path:
        src = self.directory / str(step)
        dst = self.directory / f"{step}.unreadable"
        if dst.exists():
            dst = self.directory / f"{step}.unreadable-{int(time.time())}"
        if jax.process_index() == 0 and src.exists():
            src.rename(dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"checkpoint:set_aside:{step}")
        self._manager.reload()
        return dst

    def close(self) -> None:
        self._manager.close()
