"""Evaluation arithmetic against brute-force references: pass@k by enumerating every k-subset, exact
rational arithmetic for large n, accuracy summaries, relative change, steps/hours to thresholds."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from mtgrpo_jax.train import eval_metrics as E


def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumerating_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                got = float(E.pass_at_k(n, c, k))
                assert got == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_broadcasts_and_is_precise_for_large_n():
    n = np.array([200, 200, 1000, 1000, 5000])
    c = np.array([1, 37, 0, 999, 3])
    k = 10
    got = E.pass_at_k(n, c, k)
    assert got.shape == (5,) and got.dtype == np.float64
    for ni, ci, g in zip(n, c, got):
        exact = 1 - Fraction(math.comb(int(ni - ci), k), math.comb(int(ni), k))
        assert g == pytest.approx(float(exact), rel=1e-12, abs=0)
    # A pass@k far below float eps relative to 1 keeps its digits (expm1, not 1 - exp).
    tiny = float(E.pass_at_k(10**6, 1, 1))
    assert tiny == pytest.approx(1e-6, rel=1e-12)


def test_pass_at_1_is_the_fraction_correct_and_pass_at_k_is_monotone():
    rng = np.random.default_rng(0)
    correct = rng.random((50, 8)) < rng.random((50, 1))
    per_prompt = E.pass_at_k_from_correct(correct, 1)
    np.testing.assert_allclose(per_prompt, correct.mean(axis=1), rtol=0, atol=1e-15)
    assert E.accuracy(correct) == pytest.approx(per_prompt.mean())
    curves = np.stack([E.pass_at_k_from_correct(correct, k) for k in range(1, 9)])
    assert np.all(np.diff(curves, axis=0) >= -1e-15)
    np.testing.assert_array_equal(curves[-1], correct.any(axis=1).astype(float))


def test_pass_at_k_refuses_bad_input():
    with pytest.raises(ValueError, match="exceeds the number of samples"):
        E.pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        E.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="positive integer"):
        E.pass_at_k(4, 1, 0)
    with pytest.raises(ValueError, match="integers"):
        E.pass_at_k(4.0, 1, 1)
    with pytest.raises(ValueError, match="threshold rewards first"):
        E.accuracy(np.array([[1.0, 0.1]]))
    with pytest.raises(ValueError, match=r"zebra: expected a non-empty \[prompts, samples\]"):
        E.task_accuracies({"zebra": np.zeros(3)})


def test_task_summary_and_eval_record():
    correct = {
        "countdown-l1": np.array([[1, 1, 0, 0], [1, 0, 0, 0]]),
        "zebra_3x3": np.array([[0, 0, 0, 0], [0, 0, 0, 1]], dtype=bool),
        "arc": np.ones((3, 4)),
    }
    accs = E.task_accuracies(correct)
    assert accs == {"countdown-l1": 3 / 8, "zebra_3x3": 1 / 8, "arc": 1.0}
    s = E.summarize(accs)
    assert s == (1 / 8, (3 / 8 + 1 / 8 + 1) / 3, "zebra_3x3")
    rec = E.eval_record(correct, ks=(1, 4))
    assert rec["split"] == "eval"
    assert rec["eval/worst_accuracy"] == 1 / 8 and rec["eval/mean_accuracy"] == pytest.approx(s.mean_accuracy)
    assert rec["eval/countdown-l1/pass@1"] == pytest.approx(3 / 8)
    assert rec["eval/countdown-l1/pass@4"] == 1.0 and rec["eval/zebra_3x3/pass@4"] == 0.5
    with pytest.raises(ValueError, match="'zebra' is not finite"):
        E.summarize({"a": 0.5, "zebra": float("nan")})


def test_relative_change_against_a_baseline():
    base = {"a": 0.5, "b": 0.2, "c": 0.0, "d": 0.0}
    acc = {"a": 0.6, "b": 0.1, "c": 0.3, "d": 0.0}
    r = E.relative_change(acc, base)
    assert r.mean == pytest.approx(((0.6 - 0.5) / 0.5 + (0.1 - 0.2) / 0.2) / 2)
    assert r.skipped == ["c", "d"]
    assert r.per_task["c"] == math.inf and r.per_task["d"] == 0.0
    assert r.per_task["b"] == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="baseline accuracy of task 'c' is 0"):
        E.relative_change(acc, base, zero_base="raise")
    with pytest.raises(ValueError, match="not on both sides: e"):
        E.relative_change({**acc, "e": 0.1}, base)
    only_zero = E.relative_change({"c": 0.2}, {"c": 0.0})
    assert math.isnan(only_zero.mean) and only_zero.skipped == ["c"]


def _synthetic_history(rng, n_evals=12, tasks=("countdown-l1", "zebra_3x3", "arc")):
    records = []
    for j in range(n_evals):
        step = 5 * (j + 1)
        records.append({"step": step, "elapsed_s": 90.0 * step, "task/arc/reward": 0.3})  # a train record
        accs = {t: float(rng.random()) for t in tasks}
        rec = {"step": step, "split": "eval", "elapsed_s": 90.0 * step + 1}
        rec.update({f"eval/{t}/accuracy": a for t, a in accs.items()})
        if j % 2 == 0:  # older records may lack the aggregate; it is then computed from the tasks
            rec["eval/worst_accuracy"] = min(accs.values())
        records.append(rec)
    return records


def test_steps_to_thresholds_matches_a_direct_scan():
    rng = np.random.default_rng(1)
    records = _synthetic_history(rng)
    thresholds = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.9, 1.0]
    got = E.steps_to_thresholds(records, thresholds)
    evals = [r for r in records if r.get("split") == "eval"]
    for t in thresholds:
        expected = None
        for r in evals:
            worst = min(v for k, v in r.items() if k.startswith("eval/") and k.endswith("/accuracy"))
            if worst >= t:
                expected = (r["step"], r["elapsed_s"] / 3600)
                break
        if expected is None:
            assert got[t] is None, t
        else:
            assert got[t].step == expected[0] and got[t].hours == pytest.approx(expected[1]), t
    assert got[0.0] == (5, (90.0 * 5 + 1) / 3600)


def test_eval_history_arrays_and_duplicates():
    records = [
        {"step": 10, "split": "eval", "eval/a/accuracy": 0.1, "eval/b/accuracy": 0.4, "elapsed_s": 36.0},
        {"step": 20, "split": "eval", "eval/a/accuracy": 0.2, "eval/worst_accuracy": 0.2, "eval/mean_accuracy": 0.3},
        {"step": 10, "split": "eval", "eval/a/accuracy": 0.15, "eval/b/accuracy": 0.5, "elapsed_s": 72.0},
        {"step": 15, "task/a/reward": 1.0},
    ]
    h = E.eval_history(records)
    np.testing.assert_array_equal(h.steps, [10, 20])
    np.testing.assert_allclose(h.accuracy["a"], [0.15, 0.2])
    assert h.accuracy["b"][0] == 0.5 and np.isnan(h.accuracy["b"][1])  # b not evaluated at step 20
    np.testing.assert_allclose(h.worst, [0.15, 0.2])
    np.testing.assert_allclose(h.mean, [0.325, 0.3])
    assert h.elapsed_s[0] == 72.0 and np.isnan(h.elapsed_s[1])
    hits = E.steps_to_thresholds(h, [0.2])
    assert hits[0.2].step == 20 and math.isnan(hits[0.2].hours)
    empty = E.eval_history([{"step": 1, "task/a/reward": 0.0}])
    assert empty.steps.size == 0 and E.steps_to_thresholds(empty, [0.1]) == {0.1: None}
