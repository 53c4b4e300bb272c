"""Task registry: built-ins, user tasks registered in code, by dotted path, or by entry point.

A registered entry is a factory `(**options) -> Task` (a Task class is one) or a Task instance.
Names resolve in this order: the registry (and aliases), `family-<int>` (a built-in bound to one
difficulty, e.g. `countdown-2`), a dotted path `pkg.module:attr`, then the installed packages'
entry points in group `mtgrpo_jax.tasks`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import threading
from collections.abc import Callable
from typing import Any

from mtgrpo_jax.tasks.base import BaseTask, Task

ENTRY_POINT_GROUP = "mtgrpo_jax.tasks"

TaskFactory = Callable[..., Task]
TaskLike = Task | TaskFactory

_registry: dict[str, TaskLike] = {}
_aliases: dict[str, str] = {}
_default_instances: dict[str, Task] = {}
_lock = threading.Lock()
_entry_points_loaded = False
_LEVEL_SUFFIX = re.compile(r"^(?P<family>.+)-(?P<level>\d+)$")


def _is_task(obj: Any) -> bool:
    return isinstance(obj, Task) and not isinstance(obj, type)


def register_task(
    task_or_factory: TaskLike,
    name: str | None = None,
    *,
    aliases: tuple[str, ...] = (),
    overwrite: bool = False,
) -> TaskLike:
    """Register a Task instance or a factory returning one under `name` (default: the instance's or
    the class's `name`/`family`). Returns its argument, so it also works as a class decorator."""
    if name is None:
        name = getattr(task_or_factory, "name", None)
        if not isinstance(name, str) or not name:
            name = getattr(task_or_factory, "family", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_task: cannot infer a name for {task_or_factory!r}; pass name=...")
    if not (_is_task(task_or_factory) or callable(task_or_factory)):
        raise TypeError(f"register_task: {task_or_factory!r} is neither a Task nor a factory")
    with _lock:
        for key in (name, *aliases):
            if not overwrite and (key in _registry or key in _aliases):
                raise ValueError(f"task name {key!r} is already registered (pass overwrite=True to replace it)")
        _registry[name] = task_or_factory
        _default_instances.pop(name, None)
        for alias in aliases:
            _aliases[alias] = name
    return task_or_factory


def list_tasks() -> list[str]:
    _load_entry_points()
    return sorted(_registry)


def canonical_task_name(name: str) -> str | None:
    """The registered name for a name or alias (e.g. "arc" -> "arc_1d"), or None."""
    _load_entry_points()
    if name in _registry:
        return name
    return _aliases.get(name)


def _build(entry: TaskLike, options: dict[str, Any], label: str) -> Task:
    if _is_task(entry):
        if not options:
            return entry
        if isinstance(entry, BaseTask):
            return entry.with_options(**options)
        raise ValueError(f"task {label!r} is a fixed instance and takes no options (got {sorted(options)})")
    try:
        task = entry(**options)
    except TypeError as err:
        raise ValueError(f"task {label!r}: bad options {sorted(options)}: {err}") from None
    if not _is_task(task):
        raise TypeError(f"task factory {label!r} returned {type(task).__name__}, which is not a Task")
    return task


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _registry:
            _registry[ep.name] = _LazyEntryPoint(ep)


class _LazyEntryPoint:
    """Defers importing a plug-in until its task is first requested."""

    def __init__(self, ep: importlib.metadata.EntryPoint):
        self.ep = ep

    def __call__(self, **options: Any) -> Task:
        return _build(self.ep.load(), options, self.ep.name)


def get_task(name: str, **options: Any) -> Task:
    """The task registered under `name` (or an alias, `family-<level>`, or `pkg.module:attr`),
    built with `options` (e.g. `prompt_style="compact"`, `box_last_line_only=True`)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"task name must be a non-empty string, got {name!r}")
    key = canonical_task_name(name)
    if key is not None:
        entry = _registry[key]
        if isinstance(entry, _LazyEntryPoint):
            entry = _registry[key] = entry.ep.load()
        if not options:
            with _lock:
                cached = _default_instances.get(key)
            if cached is None:
                cached = _build(entry, {}, key)
                with _lock:
                    _default_instances[key] = cached
            return cached
        return _build(entry, options, key)
    level = _LEVEL_SUFFIX.match(name)
    if level and canonical_task_name(level.group("family")) is not None and "difficulty" not in options:
        return get_task(level.group("family"), difficulty=int(level.group("level")), **options)
    if ":" in name:
        return _from_dotted_path(name, options)
    raise ValueError(f"unknown task {name!r}; registered: {list_tasks()} (or use 'pkg.module:factory')")


def _from_dotted_path(spec: str, options: dict[str, Any]) -> Task:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"task spec {spec!r} must look like 'pkg.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"task spec {spec!r}: cannot import {module_name!r}: {err}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"task spec {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return _build(obj, options, spec)


def resolve_task(spec: Any, **options: Any) -> Task:
    """A Task from whatever a config holds: a Task instance, a registered name, `family-<level>`,
    a dotted path "pkg.module:factory", or a mapping {"name": ..., **options}."""
    if _is_task(spec):
        return _build(spec, options, getattr(spec, "name", repr(spec)))
    if isinstance(spec, dict):
        spec = dict(spec)
        name = spec.pop("name", None) or spec.pop("task", None)
        if name is None:
            raise ValueError(f"task spec mapping needs a 'name' key, got keys {sorted(spec)}")
        return get_task(name, **{**spec, **options})
    if isinstance(spec, str):
        return get_task(spec, **options)
    raise TypeError(f"cannot resolve a task from {type(spec).__name__}: {spec!r}")


def _register_builtins() -> None:
    from mtgrpo_jax.tasks.arithmetic import ArithmeticTask
    from mtgrpo_jax.tasks.countdown import CountdownTask
    from mtgrpo_jax.tasks.math_answer import MathTask
    from mtgrpo_jax.tasks.puzzles import Arc1DTask, ZebraTask

    register_task(CountdownTask, "countdown")
    register_task(ZebraTask, "zebra", aliases=("zebra_puzzles",))
    register_task(Arc1DTask, "arc_1d", aliases=("arc", "arc1d"))
    register_task(MathTask, "math")
    register_task(ArithmeticTask, "arithmetic")


_register_builtins()
