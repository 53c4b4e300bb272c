"""Per-task shares of the supervised warm start (`tasks[].sft_weight`)."""

import numpy as np
import pytest

from mtgrpo_jax.config import TaskCfg
from mtgrpo_jax.train.sft import row_probabilities


def test_equal_weights_keep_the_unweighted_draw():
    assert row_probabilities(["a", "a", "b"], {"a": 1.0, "b": 1.0}) is None
    assert row_probabilities(["a", "b"], {}) is None  # a task without a weight counts as 1


def test_task_shares_follow_the_weights_whatever_the_row_counts():
    names = ["easy"] * 300 + ["mid"] * 100 + ["weak"] * 20
    weights = {"easy": 3.0, "mid": 1.0, "weak": 0.25}
    p = row_probabilities(names, weights)
    assert p.shape == (len(names),) and np.isclose(p.sum(), 1.0)
    arr = np.array(names)
    total = sum(weights.values())
    for name, w in weights.items():
        assert np.isclose(p[arr == name].sum(), w / total)
        assert np.allclose(p[arr == name], p[arr == name][0])  # rows of a task alike
    # The draw the warm start makes: each task's share of 20,000 rows within 4 standard errors.
    draws = arr[np.random.default_rng(0).choice(len(names), size=20_000, p=p)]
    for name, w in weights.items():
        share, expect = np.mean(draws == name), w / total
        assert abs(share - expect) < 4 * np.sqrt(expect * (1 - expect) / 20_000)


def test_weight_is_a_task_setting_and_must_be_positive():
    assert TaskCfg(name="t", family="arithmetic", train={"level": 1, "n": 4}, sft_weight=0.5).sft_weight == 0.5
    with pytest.raises(ValueError, match="greater than 0"):
        TaskCfg(name="t", family="arithmetic", train={"level": 1, "n": 4}, sft_weight=0.0)
