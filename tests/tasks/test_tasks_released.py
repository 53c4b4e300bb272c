"""The released MT-GRPO test sets: loading, exact prompt reproduction and the 1.0 / 0.1 / 0 protocol."""

from __future__ import annotations

import re

import pytest

from mtgrpo_jax.tasks import PROMPT_PREFIX, PROMPT_SUFFIX, get_task


def _boxed(answer: str) -> str:
    return f"<think>\nworking\n</think>\nThe final answer is \\boxed{{{answer}}}."


def test_load_examples_layout(released):
    for task, examples in released.items():
        assert len(examples) == 800
        assert {e["task"] for e in examples} == {task}
        for level in (1, 2, 3, 4):
            assert sum(e["difficulty"] == level for e in examples) == 200
        for e in examples:
            assert e["split"] == "test" and isinstance(e["question"], str) and e["prompt"][0]["role"] == "user"
    for e in released["countdown"]:
        assert isinstance(e["answer"]["target"], int)
        assert all(isinstance(x, int) for x in e["answer"]["numbers"])
        assert len(e["answer"]["numbers"]) == e["difficulty"] + 2
    assert all(isinstance(e["answer"], str) for e in released["zebra"] + released["arc_1d"])


def test_prompts_reproduce_released_text_exactly(released):
    for task_name, examples in released.items():
        task = get_task(task_name)
        for e in examples:
            bare = {k: v for k, v in e.items() if k != "prompt"}
            assert task.prompt(bare) == e["prompt"], (task_name, e["index"])


def test_compact_prompt_is_short_and_asks_for_a_box(released):
    for task_name, examples in released.items():
        task = get_task(task_name, prompt_style="compact")
        messages = task.prompt(examples[0])
        content = messages[0]["content"]
        assert len(messages) == 1 and "\\boxed{" in content
        assert not content.startswith(PROMPT_PREFIX) and not content.endswith(PROMPT_SUFFIX)
        assert len(content) < len(examples[0]["prompt"][0]["content"])


@pytest.mark.parametrize("task_name", ["zebra", "arc_1d"])
@pytest.mark.parametrize("last_line_only", [False, True])
def test_every_reference_answer_scores_one(released, task_name, last_line_only):
    task = get_task(task_name, box_last_line_only=last_line_only)
    for e in released[task_name]:
        assert task.score(_boxed(e["answer"]), e).reward == 1.0
        # the released verifiers trim surrounding whitespace and ignore case
        assert task.score(_boxed(f"  {e['answer'].upper()} "), e).correct


def _countdown_reference_scores(examples):
    task = get_task("countdown")
    parity = get_task("countdown", box_last_line_only=True)
    for e in examples:
        demo = task.demonstration(e)  # a valid expression found by the solver
        assert task.score(demo, e).reward == 1.0, demo
        assert parity.score(demo, e).reward == 1.0
        expression = re.search(r"\\boxed\{(.*)\}", demo.splitlines()[-1]).group(1)
        assert task.score(_boxed(expression), e).reward == 1.0


def test_countdown_reference_answers_score_one(released):
    examples = [e for e in released["countdown"] if e["difficulty"] <= 3]
    examples += [e for e in released["countdown"] if e["difficulty"] == 4][:25]
    _countdown_reference_scores(examples)


@pytest.mark.slow
def test_countdown_reference_answers_score_one_all_held_out(released):
    _countdown_reference_scores([e for e in released["countdown"] if e["difficulty"] == 4])


def test_wrong_boxed_answer_scores_point_one(released):
    zebra = get_task("zebra")
    for e in released["zebra"][::10]:
        names = re.search(r"unique name: ([^\n]+)", e["question"]).group(1).split(", ")
        wrong = next(n for n in names if n.lower() != e["answer"].lower())
        assert zebra.score(_boxed(wrong), e) == (0.1, False, True)
    arc = get_task("arc_1d")
    for e in released["arc_1d"][::10]:
        cells = e["answer"].split()
        cells[0] = "1" if cells[0] != "1" else "2"
        assert arc.score(_boxed(" ".join(cells)), e) == (0.1, False, True)
    countdown = get_task("countdown")
    for e in released["countdown"][::10]:
        numbers = e["answer"]["numbers"]
        assert countdown.score(_boxed(" + ".join(map(str, numbers)) + " + 1"), e).reward == 0.1  # extra literal
        assert countdown.score(_boxed(" + ".join(map(str, numbers[:-1]))), e).reward == 0.1  # one unused
        assert countdown.score(_boxed("x"), e).reward == 0.1  # boxed but not an expression


def test_no_box_scores_zero(released):
    for task_name, examples in released.items():
        task = get_task(task_name)
        for e in examples[::20]:
            answer = e["answer"] if isinstance(e["answer"], str) else "1 + 2"
            assert task.score(f"The answer is {answer}.", e) == (0.0, False, False)
            assert task.score("", e) == (0.0, False, False)
            assert task.score(f"\\boxed{{{answer}", e) == (0.0, False, False)  # never closed


def test_last_line_option_reproduces_released_reader(released):
    e = released["zebra"][0]
    text = f"\\boxed{{{e['answer']}}}\nSo that is my answer."
    assert get_task("zebra").score(text, e).reward == 1.0  # default: last box anywhere
    assert get_task("zebra", box_last_line_only=True).score(text, e).reward == 0.0


@pytest.mark.parametrize("task_name", ["zebra", "arc_1d"])
def test_demonstrations_score_one(released, task_name):
    task = get_task(task_name)
    for e in released[task_name]:
        demo = task.demonstration(e)
        assert demo.startswith("<think>") and "</think>" in demo
        assert task.score(demo, e).reward == 1.0
