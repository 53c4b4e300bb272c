"""Task registry: built-ins, options, user tasks by instance, factory, dotted path and entry point."""

from __future__ import annotations

import dataclasses
import importlib
import sys
import textwrap
from typing import ClassVar

import pytest

from mtgrpo_jax.tasks import BaseTask, Task, get_task, list_tasks, register_task, registry, resolve_task


def test_builtins_and_aliases():
    assert {"countdown", "zebra", "arc_1d", "math"} <= set(list_tasks())
    assert get_task("arc").family == "arc_1d" and get_task("zebra_puzzles").family == "zebra"
    for name in ("countdown", "zebra", "arc_1d", "math"):
        task = get_task(name)
        assert isinstance(task, Task) and task.name == name and task.difficulty is None
    assert get_task("countdown") is get_task("countdown")  # default instances are cached


def test_family_level_names_and_options():
    task = get_task("countdown-2")
    assert (task.name, task.family, task.difficulty) == ("countdown-2", "countdown", 2)
    task = get_task("zebra", prompt_style="compact", box_last_line_only=True)
    assert task.prompt_style == "compact" and task.box_last_line_only
    assert get_task("zebra").prompt_style == "released"  # the cached default is untouched
    with pytest.raises(ValueError, match="prompt_style"):
        get_task("zebra", prompt_style="short")
    with pytest.raises(ValueError, match="bad options"):
        get_task("zebra", no_such_option=1)
    with pytest.raises(ValueError, match="unknown task"):
        get_task("no_such_task")


@dataclasses.dataclass
class EchoTask(BaseTask):
    """A user task: the answer is the question reversed."""

    family: ClassVar[str] = "echo_test"

    def check(self, answer, example):
        return answer.strip() == example["question"][::-1]

    def reference_answer(self, example):
        return example["question"][::-1]


def test_register_instance_and_factory():
    register_task(EchoTask, "echo_test", overwrite=True)
    task = get_task("echo_test", difficulty=3)
    example = {"question": "abc"}
    assert task.name == "echo_test-3" and task.score(task.demonstration(example), example).reward == 1.0
    fixed = EchoTask(format_reward=0.5)
    register_task(fixed, "echo_fixed", overwrite=True)
    assert get_task("echo_fixed") is fixed
    assert get_task("echo_fixed").score("\\boxed{x}", example).reward == 0.5
    with pytest.raises(ValueError, match="already registered"):
        register_task(EchoTask, "echo_test")
    with pytest.raises(TypeError, match="neither"):
        register_task(42, "not_a_task")
    register_task(lambda **kw: "not a task", "bad_factory", overwrite=True)
    with pytest.raises(TypeError, match="not a Task"):
        get_task("bad_factory")


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A module on sys.path plus an installed-distribution stub declaring an entry point for it."""
    (tmp_path / "my_tasks_plugin.py").write_text(
        textwrap.dedent(
            """
            import dataclasses
            from typing import ClassVar
            from mtgrpo_jax.tasks import BaseTask

            @dataclasses.dataclass
            class UpperTask(BaseTask):
                family: ClassVar[str] = "upper"
                def check(self, answer, example):
                    return answer == example["question"].upper()
                def reference_answer(self, example):
                    return example["question"].upper()

            def make_upper(**options):
                return UpperTask(**options)
            """
        )
    )
    dist = tmp_path / "my_tasks_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-tasks-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[mtgrpo_jax.tasks]\nupper_ep = my_tasks_plugin:make_upper\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    yield tmp_path
    registry._registry.pop("upper_ep", None)
    registry._default_instances.pop("upper_ep", None)
    sys.modules.pop("my_tasks_plugin", None)


def test_dotted_path_and_entry_point(plugin_dir):
    example = {"question": "abc"}
    task = get_task("my_tasks_plugin:make_upper", format_reward=0.2)
    assert task.family == "upper" and task.score("\\boxed{ABC}", example).reward == 1.0
    assert task.score("\\boxed{abc}", example).reward == 0.2
    assert resolve_task("my_tasks_plugin:UpperTask").family == "upper"
    with pytest.raises(ValueError, match="no attribute"):
        get_task("my_tasks_plugin:missing")
    with pytest.raises(ValueError, match="cannot import"):
        get_task("no_such_module_xyz:thing")
    plugin = get_task("upper_ep")  # discovered through the entry point group
    assert plugin.family == "upper" and "upper_ep" in list_tasks()


def test_resolve_task_forms():
    task = get_task("zebra")
    assert resolve_task(task) is task
    assert resolve_task("arc").family == "arc_1d"
    assert resolve_task({"name": "countdown", "prompt_style": "compact"}).prompt_style == "compact"
    with pytest.raises(ValueError, match="'name'"):
        resolve_task({"prompt_style": "compact"})
    with pytest.raises(TypeError):
        resolve_task(3.5)
