"""Per-task prompt streams on grain: source -> seeded shuffle -> repeat -> iterator, checkpointable.

grain's own mixing takes fixed weights, but the task weights z change every step, so the sampler
draws per-task counts itself and pulls exactly that many prompts from each task's stream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import grain

from mtgrpo_jax.tasks import Task, get_task, load_source

_STATE_VERSION = 1


def _stream_seed(seed: int, name: str) -> int:
    """Each task's shuffle seed, from the run seed and the task's name (not its position), so adding
    a task leaves the other streams unchanged."""
    digest = hashlib.sha256(f"taskset:{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class TaskSet:
    """K named prompt streams; `take(k_index, n)` hands out the next n examples of one task.

    `tasks` maps a task name to its examples or a source (see `mtgrpo_jax.tasks.load_source`; a
    stream's name is the task of the rows that do not name theirs); the mapping's
    order fixes the task indices the sampler uses. `task_options` (e.g. {"prompt_style":
    "compact"}) are passed to `get_task` when building each stream's scoring Task.
    """

    def __init__(
        self,
        tasks: Mapping[str, Any],
        seed: int = 0,
        *,
        task_options: Mapping[str, Any] | None = None,
    ):
        if not isinstance(tasks, Mapping) or not tasks:
            raise ValueError("TaskSet needs a non-empty mapping of task name -> examples")
        self.seed = int(seed)
        self.names: list[str] = [str(name) for name in tasks]
        self._examples: list[list[dict[str, Any]]] = []
        self._tasks: list[Task] = []
        for name in self.names:
            try:
                examples = load_source(tasks[name], task=name)
            except (ValueError, TypeError) as err:
                raise type(err)(f"task {name!r}: {err}") from None
            if not examples:
                raise ValueError(f"task {name!r} has no examples")
            self._examples.append(examples)
            task_name = examples[0].get("task", name)
            self._tasks.append(get_task(task_name, **dict(task_options or {})))
        read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # no prefetch threads
        self._datasets = [
            grain.MapDataset.source(examples).shuffle(seed=_stream_seed(self.seed, name)).repeat()
            for name, examples in zip(self.names, self._examples)
        ]
        self._iterators = [iter(ds.to_iter_dataset(read_options)) for ds in self._datasets]

    @property
    def num_tasks(self) -> int:
        return len(self.names)

    def __len__(self) -> int:
        return self.num_tasks

    def sizes(self) -> list[int]:
        return [len(examples) for examples in self._examples]

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"unknown task {name!r}; tasks: {self.names}") from None

    def task(self, task_index: int) -> Task:
        """The Task that prompts and scores stream `task_index`."""
        self._check_index(task_index)
        return self._tasks[task_index]

    @property
    def tasks(self) -> list[Task]:
        return list(self._tasks)

    def examples(self, task_index: int) -> list[dict[str, Any]]:
        self._check_index(task_index)
        return self._examples[task_index]

    def take(self, task_index: int, k: int) -> list[dict[str, Any]]:
        """The next k examples of task `task_index` (copies: callers may annotate them)."""
        self._check_index(task_index)
        if k < 0:
            raise ValueError(f"take: k must be >= 0, got {k}")
        iterator = self._iterators[task_index]
        return [dict(next(iterator)) for _ in range(int(k))]

    def _check_index(self, task_index: int) -> None:
        if not 0 <= int(task_index) < self.num_tasks:
            raise ValueError(f"task index {task_index} out of range for {self.num_tasks} tasks")

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable positions of every stream."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "names": list(self.names),
            "sizes": self.sizes(),
            "iterators": [it.get_state() for it in self._iterators],
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"TaskSet state version {state.get('version')!r} != {_STATE_VERSION}")
        if list(state.get("names", [])) != self.names:
            raise ValueError(f"TaskSet state is for tasks {state.get('names')}, this set has {self.names}")
        if list(state.get("sizes", [])) != self.sizes() or int(state.get("seed", -1)) != self.seed:
            raise ValueError("TaskSet state was saved for different data (sizes or seed differ)")
        for iterator, sub in zip(self._iterators, state["iterators"]):
            iterator.set_state(dict(sub))
