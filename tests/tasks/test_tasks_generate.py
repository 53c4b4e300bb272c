"""reasoning-gym generation: items match the released sets per level; deterministic; cached CLI."""

from __future__ import annotations

import os
import re

import pyarrow.parquet as pq
import pytest

from mtgrpo_jax.tasks import generate as gen
from mtgrpo_jax.tasks import generate_examples, get_task, load_examples


def _zebra_shape(question: str) -> tuple[int, int, str]:
    houses = int(re.search(r"There are (\d+) houses", question).group(1))
    attributes = len(re.findall(r"^ - ", question, flags=re.M))
    last = re.sub(r"House \d+", "House N", question.splitlines()[-1])
    last = re.sub(r"What is .* of the person", "What is X of the person", last)
    return houses, attributes, last


def _arc_shape(example: dict) -> tuple[int, int, str]:
    question = example["question"]
    length = len(question.splitlines()[-1].split())
    examples = len(re.findall(r"^Example \d+:", question, flags=re.M))
    template = re.sub(r"[\d ]+\n", "#\n", re.sub(r"(Input|Output):[\d ]+", r"\1:#", question))
    return length, examples, template.rsplit("\n", 1)[0]


def _countdown_template(question: str) -> str:
    return re.sub(r"\d+(, \d+)*", "#", question.split("\\boxed{}")[0])


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_countdown_matches_released_level(released, level):
    ref = [e for e in released["countdown"] if e["difficulty"] == level]
    items = generate_examples("countdown", level, 6, seed=11)
    ref_targets = [e["answer"]["target"] for e in ref]
    task = get_task("countdown")
    for e in items:
        numbers, target = e["answer"]["numbers"], e["answer"]["target"]
        assert len(numbers) == len(ref[0]["answer"]["numbers"]) == level + 2
        assert min(ref_targets) <= target <= max(ref_targets) and 1 <= target <= 1000
        assert all(1 <= x <= 100 for x in numbers)
        assert _countdown_template(e["question"]) == _countdown_template(ref[0]["question"])
        assert e["data_source"] == ref[0]["data_source"].replace("-test", "-train")
        assert e["prompt"] == task.prompt(e)
        assert task.score(task.demonstration(e), e).reward == 1.0  # every generated item is solvable


@pytest.mark.parametrize("level,n", [(1, 3), (2, 2), (3, 1), pytest.param(4, 1, marks=pytest.mark.slow)])
def test_zebra_matches_released_level(released, level, n):
    ref = [e for e in released["zebra"] if e["difficulty"] == level]
    ref_shape = _zebra_shape(ref[0]["question"])
    for e in generate_examples("zebra", level, n, seed=11):
        assert _zebra_shape(e["question"]) == ref_shape  # grid size and answer instruction
        assert ref_shape[0] == ref_shape[1] == level + 2
        assert e["answer"] == e["answer"].strip().lower()
        assert get_task("zebra").score(f"\\boxed{{{e['answer'].title()}}}", e).reward == 1.0


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_arc_matches_released_level(released, level):
    ref = [e for e in released["arc_1d"] if e["difficulty"] == level]
    length, n_examples, template = _arc_shape(ref[0])
    assert length == 10 * level and n_examples == 3
    for e in generate_examples("arc_1d", level, 5, seed=11):
        assert _arc_shape(e) == (length, n_examples, template)
        assert len(e["answer"].split()) == length
        assert e["prompt"][0]["content"].startswith(ref[0]["prompt"][0]["content"][:200])


def test_generation_is_deterministic_and_sliceable():
    a = generate_examples("countdown", 2, 6, seed=3)
    assert a == generate_examples("countdown", 2, 6, seed=3)
    assert a[2:] == generate_examples("countdown", 2, 4, seed=3, start=2)
    assert [e["answer"] for e in a] != [e["answer"] for e in generate_examples("countdown", 2, 6, seed=4)]
    assert [e["index"] for e in a] == list(range(6))
    with pytest.raises(ValueError, match="cannot generate"):
        generate_examples("math", 1, 1)
    with pytest.raises(ValueError, match="level"):
        generate_examples("arc_1d", 7, 1)


def test_cli_generates_caches_and_resumes(tmp_path, monkeypatch):
    out = str(tmp_path / "data")
    argv = [
        "--tasks",
        "countdown,arc",
        "--levels",
        "1,2",
        "--per-level",
        "6",
        "--out",
        out,
        "--workers",
        "1",
        "--chunk-size",
        "4",
        "--no-progress",
        "--seed",
        "5",
    ]
    assert gen.main(argv, prog="mtgrpo data generate") == 0
    paths = {
        (t, level): os.path.join(out, t, f"train_level{level}.parquet")
        for t in ("countdown", "arc_1d")
        for level in (1, 2)
    }
    for (task, level), path in paths.items():
        examples = load_examples(path)
        assert len(examples) == 6 and {e["task"] for e in examples} == {task}
        assert {e["difficulty"] for e in examples} == {level} and [e["index"] for e in examples] == list(range(6))
        assert examples == generate_examples(task, level, 6, seed=5)  # the pool and the cache change nothing

    calls = []
    real = gen.generate_rows
    monkeypatch.setattr(gen, "generate_rows", lambda *a, **k: calls.append(a[2:4]) or real(*a, **k))
    assert gen.main(argv, prog="mtgrpo data generate") == 0
    assert calls == []  # everything cached
    argv[argv.index("--per-level") + 1] = "9"
    assert gen.main(argv, prog="mtgrpo data generate") == 0
    assert sorted(calls) == [(6, 9)] * 4  # only the missing items, for each task and level
    assert [e["index"] for e in load_examples(paths[("arc_1d", 2)])] == list(range(9))


def test_cli_output_schema_matches_released(tmp_path, released_dir):
    out = str(tmp_path / "data")
    argv = [
        "--tasks",
        "countdown,zebra",
        "--levels",
        "1",
        "--per-level",
        "2",
        "--out",
        out,
        "--workers",
        "1",
        "--no-progress",
    ]
    assert gen.main(argv, prog="gen") == 0
    for task, name in (("countdown", "test_countdown.parquet"), ("zebra", "test_zebra.parquet")):
        released_schema = pq.read_schema(os.path.join(released_dir, name)).remove_metadata()
        assert pq.read_schema(os.path.join(out, task, "train_level1.parquet")).remove_metadata().equals(released_schema)


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    assert gen.main(["--tasks", "math", "--per-level", "2", "--out", str(tmp_path)], prog="gen") == 2
    assert "cannot generate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gen.main(["--levels", "one", "--per-level", "2", "--out", str(tmp_path)], prog="gen")


@pytest.mark.slow
def test_cli_parallel_workers_match_inline(tmp_path):
    out = str(tmp_path / "par")
    argv = [
        "--tasks",
        "countdown",
        "--levels",
        "3",
        "--per-level",
        "8",
        "--out",
        out,
        "--workers",
        "2",
        "--chunk-size",
        "2",
        "--no-progress",
    ]
    assert gen.main(argv, prog="gen") == 0
    assert load_examples(os.path.join(out, "countdown", "train_level3.parquet")) == generate_examples("countdown", 3, 8)


def test_mtgrpo_cli_dispatches_data_generate(tmp_path, capsys):
    from mtgrpo_jax import cli

    out = str(tmp_path / "cli")
    assert (
        cli.main(
            [
                "data",
                "generate",
                "--tasks",
                "arc_1d",
                "--levels",
                "1",
                "--per-level",
                "2",
                "--out",
                out,
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "arc_1d level 1" in capsys.readouterr().out
    assert len(load_examples(os.path.join(out, "arc_1d", "train_level1.parquet"))) == 2
