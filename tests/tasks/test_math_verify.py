"""The math family's two-tier answer check: the safe reader, then math-verify in worker processes with a time
limit. Correct answers the safe reader misses are accepted; wrong ones never are; a pathological answer costs
at most the time limit and its worker, never the caller."""

from __future__ import annotations

import time

import pytest

from mtgrpo_jax.tasks.math_answer import MathVerifyPool, answers_equivalent, math_verify_pool, safe_equivalent

# Correct pairs the safe reader alone rejects (set order, radicals, pi, polynomial order, powers, units, ...).
CORRECT = [
    ("\\{2, 1\\}", "\\{1, 2\\}"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
    ("\\frac{\\pi}{2}", "\\pi/2"),
    ("2x+1", "1+2x"),
    ("10^{3}", "1000"),
    ("5\\text{ cm}^2", "5"),
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}"),
    ("2^{10}", "1024"),
    ("(x+1)^2", "x^2+2x+1"),
    ("\\frac{3}{\\sqrt{3}}", "\\sqrt{3}"),
]
# Wrong pairs: none may be accepted.
WRONG = [
    ("x+1", "x-1"),
    ("3", "3.0001"),
    ("2", "-2"),
    ("\\infty", "-\\infty"),
    ("1,2", "1"),
    ("1", "1,2"),
    ("(1,2)", "[1,2]"),
    ("A", "B"),
    ("3.14", "\\pi"),
    ("0.33", "\\frac{1}{3}"),
    ("\\sqrt{3}", "3"),
    ("2x", "x^2"),
    ("\\{1, 2\\}", "\\{1, 2, 3\\}"),
    ("\\frac{\\pi}{3}", "\\frac{\\pi}{2}"),
    ("9^{9^{9^{9}}}", "1"),
    ("x^{x^{x^{x^{x}}}}", "2"),
]


@pytest.fixture
def pool() -> MathVerifyPool:
    """The pool with every worker up (one killed by an earlier test is being replaced in the background)."""
    p = math_verify_pool()
    assert p.wait_ready(180), "math-verify workers did not start (is math-verify installed?)"
    return p


@pytest.mark.parametrize("answer,reference", CORRECT)
def test_math_verify_accepts_correct_answers_the_safe_reader_misses(pool, answer, reference):
    assert not safe_equivalent(answer, reference)
    assert answers_equivalent(answer, reference, timeout_s=30)


@pytest.mark.parametrize("answer,reference", WRONG)
def test_wrong_answers_are_never_accepted(pool, answer, reference):
    assert not answers_equivalent(answer, reference, timeout_s=5)


def test_a_hanging_answer_is_cut_off_and_its_worker_replaced(pool):
    # sympy expanding a power tower: the worker is killed at the limit, the verdict is the safe reader's
    killed = pool.killed
    start = time.perf_counter()
    assert pool.equivalent("9^{9^{9^{9^{9}}}}-1", "2", timeout_s=0.5) is None
    assert time.perf_counter() - start < 5
    assert pool.wait_ready(180)  # replaced
    assert pool.killed == killed + 1
    assert answers_equivalent("2x+1", "1+2x", timeout_s=30)  # and the pool still answers


def test_without_math_verify_only_the_safe_reader_counts():
    assert not answers_equivalent("2x+1", "1+2x", use_math_verify=False)
    assert answers_equivalent("0.5", "\\frac{1}{2}", use_math_verify=False)


def test_math_task_scores_a_reordered_answer_correct(pool):
    from mtgrpo_jax.tasks import get_task

    task = get_task("math").with_options(math_verify_timeout_s=30)
    assert task.score("so \\boxed{1+2x}", {"question": "q", "answer": "2x+1"}).correct
    assert not task.score("so \\boxed{1-2x}", {"question": "q", "answer": "2x+1"}).correct


def test_adversarial_completions_cost_at_most_the_time_limit_and_never_score_correct(pool):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_tasks_verifiers import ADVERSARIAL, MATH

    from mtgrpo_jax.tasks import get_task

    task = get_task("math").with_options(math_verify_timeout_s=1.0)
    for name, text in ADVERSARIAL.items():
        start = time.perf_counter()
        score, status = task.score_with_status(text, MATH)
        # waiting for a free worker (a quarter of the limit) + the limit itself, plus scheduling slack
        assert time.perf_counter() - start < 1.25 + 1.0, name
        assert status == "ok" and not score.correct, name
