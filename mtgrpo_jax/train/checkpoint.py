"""Checkpoints with orbax: device arrays (parameters, optimizer and task-weight state) plus a JSON record
of the host state (step, sampler and data-stream states, metric history).

Orbax writes each step into a temporary directory and renames it only once everything is on disk, so a
checkpoint is complete or absent, never half-written; `latest_step` only sees finished ones.
"""

from __future__ import annotations

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

    def close(self) -> None:
        self._manager.close()
