"""Verifiers on hand-made and adversarial completions: exactness, limits, exception safety, timing."""

from __future__ import annotations

import dataclasses
import time
from fractions import Fraction
from typing import ClassVar

import pytest

from mtgrpo_jax.tasks import (
    BaseTask,
    Score,
    answers_equivalent,
    evaluate_expression,
    extract_boxed,
    get_task,
    score_batch,
    solve_countdown,
)
from mtgrpo_jax.tasks.countdown import ExpressionError, is_correct_expression

COUNTDOWN = {"task": "countdown", "question": "q", "answer": {"numbers": [8, 73, 96], "target": 841}}
ZEBRA = {"task": "zebra", "question": "q", "answer": "alice"}
ARC = {"task": "arc_1d", "question": "q", "answer": "0 0 1 2"}
MATH = {"task": "math", "question": "q", "answer": "\\frac{1}{2}"}


# --- box reading ---------------------------------------------------------------------------------
def test_extract_boxed_nested_and_last():
    assert extract_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_boxed("a \\boxed{1} b \\boxed{2} c") == "2"
    assert extract_boxed("\\boxed{1} then \\boxed{2") == "1"  # truncated last box: the one before
    assert extract_boxed("\\boxed{}") == ""
    assert extract_boxed("\\boxed 5") is None and extract_boxed("no box") is None
    assert extract_boxed(None) is None


def test_extract_boxed_last_line_parity():
    text = "\\boxed{1}\nfinal line \\boxed{2} tail"
    assert extract_boxed(text, last_line_only=True) == "2"
    assert extract_boxed("\\boxed{1}\nno box here", last_line_only=True) is None
    # released reader: only the last \boxed of the last line counts, even if it is broken
    assert extract_boxed("\\boxed{1} \\boxed{2", last_line_only=True) is None
    assert extract_boxed("\\boxed{1} \\boxed{2", last_line_only=False) == "1"


# --- countdown -----------------------------------------------------------------------------------
def test_countdown_parser_exact_arithmetic():
    assert evaluate_expression("8 * 96 + 73") == (Fraction(841), [8, 96, 73])
    assert evaluate_expression("(1 / 3) * 3")[0] == 1  # exact, no float rounding
    assert evaluate_expression("2 - -3")[0] == 5  # unary minus, as Python's eval allowed
    assert evaluate_expression("-(2 + 3) * +4")[0] == -20
    assert evaluate_expression("7 - 2 - 1")[0] == 4 and evaluate_expression("8 / 4 / 2")[0] == 1
    with pytest.raises(ZeroDivisionError):
        evaluate_expression("1 / (2 - 2)")


@pytest.mark.parametrize(
    "text",
    [
        "2 ** 3",
        "8 // 2",
        "x + 1",
        "abs(3)",
        "(1).real",
        "1.5 + 2",
        "08 + 1",
        "(1 + 2",
        "1 + 2)",
        "1 +",
        "",
        "1 2",
        "٣ + 1",
        "1²",
        "８ + 1",
        "__import__('os')",
        "1 = 1",
        "3 \\times 4",
        "1e3",
    ],
)
def test_countdown_rejects_non_expressions(text):
    with pytest.raises(ExpressionError):
        evaluate_expression(text)


def test_countdown_number_usage_and_target():
    nums, target = [8, 73, 96], 841
    assert is_correct_expression("96*8+73", nums, target)
    assert is_correct_expression("73 + (96 * 8)", nums, target)
    assert not is_correct_expression("96*8+73+0", nums, target)  # extra number
    assert not is_correct_expression("96*8+73", [8, 73, 96, 1], target)  # a number unused
    assert not is_correct_expression("96*8+8", nums, 776)  # a number used twice
    assert not is_correct_expression("96*8-73", nums, target)  # wrong value
    assert not is_correct_expression("73/(96-96)*8", nums, target)  # division by zero -> wrong, no raise
    assert is_correct_expression("(3 + 3) / 3 * 1", [3, 3, 3, 1], 2)  # duplicates counted as a multiset
    task = get_task("countdown")
    assert task.score("\\boxed{96*8+73}", COUNTDOWN) == Score(1.0, True, True)
    assert task.score("\\boxed{96 \\times 8 + 73}", COUNTDOWN) == Score(0.1, False, True)
    raw_row = {"reward_model": {"ground_truth": {"numbers": "8,73,96", "target": 841}}}
    assert task.score("\\boxed{96*8+73}", raw_row).correct  # raw verl rows work too


def test_countdown_solver():
    expression, steps = solve_countdown([8, 73, 96], 841)
    assert is_correct_expression(expression, [8, 73, 96], 841) and steps[-1].endswith("= 841")
    expression, _ = solve_countdown([4, 4, 4, 4], 9)
    assert is_correct_expression(expression, [4, 4, 4, 4], 9)
    assert solve_countdown([1, 1], 5) is None
    assert solve_countdown([7], 7)[0] == "7"
    expression, _ = solve_countdown([3, 7, 2, 9, 25, 50], 913)
    assert is_correct_expression(expression, [3, 7, 2, 9, 25, 50], 913)


# --- math ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "answer,reference",
    [
        ("0.5", "\\frac{1}{2}"),
        ("\\dfrac{1}{2}", "\\frac12"),
        ("1/2", "\\frac{1}{2}"),
        ("5", "5.0"),
        ("5.00", "5"),
        ("\\$36", "36"),
        ("36^\\circ", "36"),
        ("5.4 \\text{ cents}", "5.4"),
        ("x = 3", "3"),
        ("\\text{(C)}", "C"),
        ("1,000", "1000"),
        ("10\\%", "10"),
        ("\\left(2, 3\\right)", "(2,3)"),
        ("3\\sqrt{5}", "3 \\sqrt{5}"),
        ("\\sqrt3", "\\sqrt{3}"),
        ("-\\frac{3}{4}", "-0.75"),
        (".5", "0.5"),
        ("\\frac{4}{8}", "0.5"),
    ],
)
def test_math_equivalent(answer, reference):
    assert answers_equivalent(answer, reference)


@pytest.mark.parametrize(
    "answer,reference",
    [
        ("0.51", "\\frac{1}{2}"),
        ("2", "3"),
        ("(2,3)", "[2,3]"),
        ("\\sqrt{5}", "5"),
        ("1e999999999", "1"),
        ("\\frac{1}{0}", "0"),
    ],
)
def test_math_not_equivalent(answer, reference):
    assert not answers_equivalent(answer, reference)


def test_math_task_scores():
    task = get_task("math")
    assert task.score("so \\boxed{\\dfrac{1}{2}}", MATH).reward == 1.0
    assert task.score("so \\boxed{\\dfrac{1}{3}}", MATH).reward == 0.1
    assert task.prompt({"question": "What is 1+1?"})[0]["content"].endswith(
        "What is 1+1? Put your final answer within \\boxed{}. \nAssistant: Let me solve this step by step."
    )


# --- adversarial completions -------------------------------------------------------------------
ADVERSARIAL = {
    "deep_nesting": "\\boxed{" + "(" * 100_000 + "8" + ")" * 100_000 + "}",
    "deep_nesting_in_limit": "\\boxed{" + "(" * 200 + "96*8+73" + ")" * 200 + "}",
    "unary_chain": "\\boxed{" + "-" * 400 + "8}",
    "huge_exponent": "\\boxed{9**9**9**9}",
    "huge_exponent_latex": "\\boxed{10^{99999999}}",
    "huge_scientific": "\\boxed{1e999999999}",
    "huge_literal": "\\boxed{" + "9" * 5000 + "}",
    "megabyte_prefix": "a" * 1_000_000 + "\\boxed{96*8+73}",
    "megabyte_open_braces": "\\boxed{" + "{" * 1_000_000,
    "megabyte_of_boxes": "\\boxed{" * 200_000,
    "megabyte_box": "\\boxed{" + "1+" * 500_000 + "1}",
    "megabyte_newlines": "\n" * 1_000_000 + "\\boxed{x}",
    "unicode_digits": "\\boxed{٨*٩٦+٧٣}",
    "fullwidth_digits": "\\boxed{８*９６+７３}",
    "superscript": "\\boxed{8²}",
    "dunder_import": "\\boxed{__import__('os').system('echo pwned')}",
    "eval_call": "\\boxed{eval('1')}",
    "unbalanced_open": "\\boxed{(8*96+73}",
    "unbalanced_braces": "\\boxed{8*96+73",
    "stray_closing": "}}}}\\boxed{}}}}}",
    "nul_bytes": "\\boxed{\x00\x00}",
    "lone_surrogate": "\\boxed{\ud800}",
    "many_fracs": "\\boxed{" + "\\frac" * 300 + "}",
    "nested_text": "\\boxed{" + "\\text{" * 300 + "a" + "}" * 300 + "}",
    "regex_bomb_spaces": "\\boxed{" + " " * 1000 + "\\text{ " + " " * 1000 + "x}",
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
@pytest.mark.parametrize("example", [COUNTDOWN, ZEBRA, ARC, MATH], ids=lambda e: e["task"])
def test_adversarial_completion_is_fast_and_safe(name, example):
    task = get_task(example["task"])
    if example is MATH:  # the in-process tier; math-verify's bound is its time limit (tests/tasks/test_math_verify.py)
        task = task.with_options(use_math_verify=False)
    text = ADVERSARIAL[name]
    start = time.perf_counter()
    score, status = task.score_with_status(text, example)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.05, f"{name} on {example['task']} took {elapsed * 1e3:.1f} ms"
    assert status == "ok"
    if name == "megabyte_prefix" and example is COUNTDOWN:  # a correct answer after 1 MB of noise
        assert score.reward == 1.0
    else:
        assert score.reward in (0.0, 0.1) and not score.correct


def test_in_limit_nesting_still_scores_correct():
    assert (
        get_task("countdown").score(ADVERSARIAL["deep_nesting_in_limit"], COUNTDOWN).reward == 0.1
    )  # depth 200 > limit
    assert get_task("countdown").score("\\boxed{" + "(" * 20 + "96*8+73" + ")" * 20 + "}", COUNTDOWN).correct


# --- batch scoring -------------------------------------------------------------------------------
@dataclasses.dataclass
class _Raising(BaseTask):
    family: ClassVar[str] = "raising"

    def check(self, answer, example):
        raise RuntimeError("verifier bug")


@dataclasses.dataclass
class _Slow(BaseTask):
    family: ClassVar[str] = "slow"

    def check(self, answer, example):
        time.sleep(0.3)
        return True


class _ProtocolOnly:
    """A user task implementing only the protocol, whose score raises."""

    name = family = "protocol_only"
    difficulty = None

    def prompt(self, example):
        return [{"role": "user", "content": "q"}]

    def score(self, completion, example):
        raise ValueError("boom")


@pytest.mark.parametrize("workers", [0, 4])
def test_score_batch_counts_errors_and_timeouts(workers):
    items = [COUNTDOWN, ZEBRA, ARC, MATH, {"task": "raising"}, {"task": "slow"}, {"task": "protocol_only"}]
    texts = ["\\boxed{96*8+73}", "\\boxed{Alice}", "\\boxed{0 0 1 3}", "none", "\\boxed{1}", "\\boxed{1}", "x"]
    tasks = {"raising": _Raising(), "slow": _Slow(), "protocol_only": _ProtocolOnly()}
    scores, stats = score_batch(items, texts, workers=workers, timeout_s=0.1, tasks=tasks)
    assert [s.reward for s in scores] == [1.0, 1.0, 0.1, 0.0, 0.0, 0.0, 0.0]
    assert stats.n == 7 and stats.errors == 2 and stats.timeouts == 1
    assert stats.accuracy == pytest.approx(2 / 7) and stats.format_rate == pytest.approx(3 / 7)
    assert stats.as_dict()["reward/timeouts"] == 1.0


def test_score_batch_matches_single_scoring_and_validates():
    items = [COUNTDOWN, ZEBRA] * 20
    texts = ["\\boxed{96*8+73}", "\\boxed{bob}"] * 20
    threaded, _ = score_batch(items, texts, workers=4)
    inline, _ = score_batch(items, texts, workers=0)
    assert threaded == inline == [get_task(i["task"]).score(t, i) for i, t in zip(items, texts)]
    with pytest.raises(ValueError, match="items but"):
        score_batch(items, texts[:-1])
    with pytest.raises(ValueError, match="unknown task"):
        score_batch([{"task": "nope"}], ["x"])
    scores, stats = score_batch([COUNTDOWN], [None])  # not a string: scored 0 and counted
    assert scores[0].reward == 0.0 and stats.errors == 1
