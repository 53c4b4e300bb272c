"""A user's own task family is one file plus one line of config: the family below is defined here, in a
test module, and reached only through `family: test_tasks_user_family:VowelCountTask`."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest

from mtgrpo_jax.tasks import BaseTask


# --- the user's file: everything the family needs --------------------------------------------------------
@dataclasses.dataclass
class VowelCountTask(BaseTask):
    """How many vowels does a word have? Level L draws words of 3L to 3L + 2 letters."""

    family: ClassVar[str] = "vowels"
    levels: ClassVar[dict[int, dict[str, Any]]] = {1: {"letters": [3, 5]}, 2: {"letters": [6, 8]}}
    generator_version: ClassVar[int] = 1

    def generate_items(self, level: int, start: int, stop: int, base_seed: int) -> Iterator[tuple[int, str, Any]]:
        for index in range(start, stop):
            rng = random.Random(index * 2**32 + base_seed)
            word = "".join(
                rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(*self.levels[level]["letters"]))
            )
            yield (
                index,
                f"How many vowels (a, e, i, o, u) does '{word}' have?",
                {"target": str(sum(c in "aeiou" for c in word))},
            )

    def check(self, answer: str, example: Mapping[str, Any]) -> bool:
        return answer.strip() == str(example["answer"])

    def reference_answer(self, example: Mapping[str, Any]) -> str:
        return str(example["answer"])


# ----------------------------------------------------------------------------------------------------------


SPEC = "test_tasks_user_family:VowelCountTask"


@pytest.fixture
def importable(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def _config(tmp_path: Path, task_line: str):
    from mtgrpo_jax.config import load_config

    preset = tmp_path / "run.yaml"
    preset.write_text(f"data_dir: {tmp_path / 'data'}\nrollout: {{prompt_style: compact}}\ntasks:\n  - {task_line}\n")
    return load_config(preset)


def test_one_line_of_config_generates_and_scores_a_user_family(importable, tmp_path):
    from mtgrpo_jax.data import TaskSet
    from mtgrpo_jax.train.setup import build_tasks

    cfg = _config(
        tmp_path, f"{{name: vowels, family: '{SPEC}', train: {{level: 1, n: 12}}, eval: {{level: 2, n: 5, seed: 3}}}}"
    )
    (task,) = build_tasks(cfg)
    assert task.task.family == "vowels" and task.task.prompt_style == "compact"
    assert len(task.train) == 12 and len(task.eval) == 5
    assert {e["difficulty"] for e in task.train} == {1} and {e["difficulty"] for e in task.eval} == {2}
    assert all(3 <= len(e["question"].split("'")[1]) <= 5 for e in task.train)
    for example in task.train + task.eval:
        word = example["question"].split("'")[1]
        assert example["answer"] == str(sum(c in "aeiou" for c in word))
        assert task.task.score(task.task.demonstration(example), example).reward == 1.0
        assert task.task.score("\\boxed{99}", example).reward == 0.1
    cached = sorted(p.name for p in (tmp_path / "data").rglob("*_level*.parquet"))
    assert cached == ["test_level2.parquet", "train_level1.parquet"]
    assert build_tasks(cfg)[0].train == task.train  # read back from the cache, unchanged
    stream = TaskSet({"vowels": task.train})  # the data streams find the family through the examples
    assert stream.task(0).family == "vowels" and len(stream.take(0, 20)) == 20


def test_user_family_reads_any_file_with_mapped_columns(importable, tmp_path):
    from mtgrpo_jax.train.setup import build_tasks

    rows = [
        {"prompt": "How many vowels does 'idea' have?", "target": 3, "lvl": 1},
        {"prompt": "How many vowels does 'rhythm' have?", "target": 0, "lvl": 2},
    ]
    (tmp_path / "words.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "words.csv").write_text(
        "prompt,target,lvl\n" + "".join(f'"{r["prompt"]}",{r["target"]},{r["lvl"]}\n' for r in rows)
    )
    for name in ("words.jsonl", "words.csv"):
        line = (
            f"{{name: vowels, family: '{SPEC}', train: {{path: {tmp_path / name}, columns: {{question: prompt, "
            f"answer: target, difficulty: lvl}}}}, eval: {{path: {tmp_path / name}, level: 2, "
            f"columns: {{question: prompt, answer: target, difficulty: lvl}}}}}}"
        )
        (task,) = build_tasks(_config(tmp_path, line))
        assert [e["question"] for e in task.train] == [r["prompt"] for r in rows]
        assert [e["answer"] for e in task.train] == ["3", "0"] and [e["difficulty"] for e in task.train] == [1, 2]
        assert [e["answer"] for e in task.eval] == ["0"]
        assert all(e["task"] == SPEC for e in task.train)
        assert task.task.score("\\boxed{3}", task.train[0]).correct
    from mtgrpo_jax.config import ConfigError

    bad = (
        f"{{name: vowels, family: '{SPEC}', train: {{path: {tmp_path / 'words.jsonl'}, "
        "columns: {question: text, answer: target}}}"
    )
    with pytest.raises(ConfigError, match=r"tasks\.0\.train: .*no column 'text' for the question"):
        build_tasks(_config(tmp_path, bad))


def test_data_generate_cli_takes_a_user_family(importable, tmp_path, capsys):
    from mtgrpo_jax import cli
    from mtgrpo_jax.tasks import generate_examples, load_examples

    out = tmp_path / "gen"
    assert (
        cli.main(
            [
                "data",
                "generate",
                "--tasks",
                SPEC,
                "--levels",
                "1,2",
                "--per-level",
                "3",
                "--out",
                str(out),
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "level 2" in capsys.readouterr().out
    (folder,) = [p for p in out.iterdir() if not p.name.startswith(".")]
    assert load_examples(folder / "train_level2.parquet", task=SPEC) == generate_examples(SPEC, 2, 3)
