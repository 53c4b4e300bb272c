"""The built-in arithmetic family: operand ranges per level, determinism, safe integer checking, CLI."""

from __future__ import annotations

import os
import re
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtgrpo_jax.tasks import ArithmeticTask, generate_examples, get_task, list_tasks, load_examples
from mtgrpo_jax.tasks import generate as gen

_QUESTION = re.compile(r"What is (\d+) ([-+*]) (\d+)(?: \+ (\d+))?\? Give the final answer in \\boxed\{\}\.")
SINGLE, TWO_DIGIT = range(0, 10), range(10, 100)


def _parse(question: str) -> tuple[int, str, int, int | None]:
    match = _QUESTION.fullmatch(question)
    assert match is not None, question
    a, op, b, c = match.groups()
    return int(a), op, int(b), None if c is None else int(c)


@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
def test_levels_have_their_operand_ranges_and_exact_answers(level):
    task = get_task("arithmetic")
    examples = generate_examples("arithmetic", level, 200, seed=7)
    ops = set()
    for e in examples:
        a, op, b, c = _parse(e["question"])
        ops.add(op)
        if level == 1:
            assert op == "+" and a in SINGLE and b in SINGLE and c is None
            expected = a + b
        elif level == 2:
            assert op in "+-" and a in TWO_DIGIT and b in SINGLE and c is None
            expected = a + b if op == "+" else a - b
            assert expected >= 0
        elif level == 3:
            assert op == "*" and a in SINGLE and b in SINGLE and c is None
            expected = a * b
        elif level == 5:
            assert op == "-" and a in SINGLE and b in SINGLE and c is None
            expected = a - b
        else:
            assert op == "*" and a in SINGLE and b in SINGLE and c in TWO_DIGIT
            expected = a * b + c
        assert e["answer"] == str(expected)
        assert e["task"] == "arithmetic" and e["difficulty"] == level and e["split"] == "train"
        assert e["data_source"] == f"arithmetic-{gen._level_name(level)}-train"
        assert e["prompt"] == task.prompt(e)  # the released frame around the question
    assert ops == {1: {"+"}, 2: {"+", "-"}, 3: {"*"}, 4: {"*"}, 5: {"-"}}[level]
    if level == 5:
        assert any(int(e["answer"]) < 0 for e in examples)  # negative answers: the reader's "-" path
    # 200 draws from 100 (level 1, 3, 5) or more possible items: the stream is not degenerate.
    assert len({e["question"] for e in examples}) > 50


def test_generation_is_deterministic_sliceable_and_seeded():
    a = generate_examples("arithmetic", 2, 12, seed=3)
    assert a == generate_examples("arithmetic", 2, 12, seed=3)
    assert a[5:] == generate_examples("arithmetic", 2, 7, seed=3, start=5)
    assert [e["index"] for e in a] == list(range(12))
    assert [e["question"] for e in a] != [e["question"] for e in generate_examples("arithmetic", 2, 12, seed=4)]
    # Pinned stream: a change here must bump arithmetic.GENERATOR_VERSION (it keys the parquet cache).
    assert [e["question"].split("?")[0] for e in generate_examples("arithmetic", 1, 3, seed=0)] == [
        "What is 0 + 7",
        "What is 9 + 4",
        "What is 1 + 2",
    ]
    with pytest.raises(ValueError, match="level"):
        generate_examples("arithmetic", 6, 1)


def test_registry_prompts_and_levels():
    assert "arithmetic" in list_tasks()
    task = get_task("arithmetic-3", prompt_style="compact")
    assert isinstance(task, ArithmeticTask) and task.name == "arithmetic-3" and task.difficulty == 3
    e = generate_examples("arithmetic", 3, 1, seed=1)[0]
    assert task.prompt(e) == [{"role": "user", "content": e["question"]}]  # already asks for the box
    assert len(e["question"]) < 60


@pytest.mark.parametrize("style", ["answer", "reasoning"])
@pytest.mark.parametrize("last_line_only", [False, True])
def test_references_and_demonstrations_score_one(style, last_line_only):
    task = get_task("arithmetic", demonstration_style=style, box_last_line_only=last_line_only)
    for level in (1, 2, 3, 4, 5):
        for e in generate_examples("arithmetic", level, 10, seed=2):
            assert task.score(f"\\boxed{{{task.reference_answer(e)}}}", e).reward == 1.0
            demo = task.demonstration(e)
            assert task.score(demo, e) == (1.0, True, True), demo
            if style == "answer":
                assert demo == f"\\boxed{{{e['answer']}}}"
            else:
                a, op, b, _ = _parse(e["question"])
                assert demo.startswith(f"<think>\n{a} {op} {b} = ")  # worked steps, ending in the answer
                assert demo.split("</think>")[0].rstrip().endswith(f"= {e['answer']}")


def test_demonstration_shows_product_before_sum():
    e = {"task": "arithmetic", "question": "What is 9 * 7 + 19? Give the final answer in \\boxed{}.", "answer": "82"}
    assert "9 * 7 = 63\n63 + 19 = 82" in get_task("arithmetic").demonstration(e)


def test_scores_wrong_and_missing_answers():
    task = get_task("arithmetic")
    e = {"task": "arithmetic", "question": "What is 7 + 5? Give the final answer in \\boxed{}.", "answer": "12"}
    assert task.score("so \\boxed{12}", e) == (1.0, True, True)
    assert task.score("\\boxed{ 12 }", e).reward == 1.0  # surrounding whitespace is stripped
    assert task.score("\\boxed{012}", e).reward == 1.0  # compared as integers
    assert task.score("\\boxed{13}", e) == (0.1, False, True)
    assert task.score("\\boxed{-12}", e).reward == 0.1
    assert task.score("\\boxed{}", e).reward == 0.1
    assert task.score("12", e) == (0.0, False, False)
    assert task.score("", e).reward == 0.0
    negative = {"task": "arithmetic", "question": "q", "reward_model": {"ground_truth": {"target": "-3"}}}
    assert task.score("\\boxed{-3}", negative).reward == 1.0  # raw verl rows work too
    assert task.score("\\boxed{3}", negative).reward == 0.1


@pytest.mark.parametrize(
    "answer",
    [
        "7+5",
        "7 + 5",
        "10+2",
        "__import__('os').system('echo hi')",
        "12.0",
        "1.2e1",
        "+12",
        "- 12",
        "1_2",
        "0x0C",
        "12/1",
        "twelve",
        "１２",
        "١٢",
        "12\u0662",
        "¹²",
        "(12)",
        "{12}",
        "12 12",
        "1" * 13,
        "0" * 11 + "12",
        "9" * 5000,
        "-" + "9" * 13,
    ],
)
def test_adversarial_answers_are_wrong_but_formatted(answer):
    task = get_task("arithmetic")
    e = {"task": "arithmetic", "question": "q", "answer": "12"}
    assert task.check(answer, e) is False
    reward = task.score(f"\\boxed{{{answer}}}", e).reward
    # A box longer than base.MAX_BOX_CONTENT_CHARS is not read at all (no answer: 0).
    assert reward == (0.1 if len(answer) < 2048 else 0.0)


def test_huge_inputs_are_cheap():
    task = get_task("arithmetic")
    e = {"task": "arithmetic", "question": "q", "answer": "12"}
    huge = "1" * 2_000_000
    start = time.perf_counter()
    assert task.check(huge, e) is False
    assert task.check(" " * 1_000_000 + "12", e) is True  # whitespace is stripped, not bounded
    assert task.score(f"\\boxed{{{huge}}}" * 3 + "\\boxed{12}", e).reward == 1.0
    assert task.score(f"\\boxed{{{huge}}}", e).reward == 0.0
    assert time.perf_counter() - start < 1.0
    assert task.check("9" * 12, {"answer": "9" * 12}) is True  # 12 digits is the limit, inclusive


def test_cli_writes_verl_parquet(tmp_path, capsys):
    from mtgrpo_jax import cli

    out = str(tmp_path / "data")
    argv = [
        "data",
        "generate",
        "--tasks",
        "arithmetic",
        "--levels",
        "1,2,3",
        "--per-level",
        "5",
        "--out",
        out,
        "--workers",
        "1",
        "--no-progress",
        "--chunk-size",
        "2",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    for level in (1, 2, 3):
        path = os.path.join(out, "arithmetic", f"train_level{level}.parquet")
        assert f"arithmetic level {level}: {path}" in printed
        schema = pq.read_schema(path)
        assert schema.field("reward_model").type.field("ground_truth").type == pa.struct([("target", pa.string())])
        assert {"difficulty", "type"} <= {f.name for f in schema.field("extra_info").type}
        examples = load_examples(path)
        assert examples == generate_examples("arithmetic", level, 5)  # chunks + cache change nothing
        assert [e["index"] for e in examples] == list(range(5)) and {e["difficulty"] for e in examples} == {level}
    assert len(load_examples(out)) == 15  # the task is told by extra_info.type
