"""The per-task step signals (pure NumPy) against a direct loop over the groups, the sampler's counts
check, and the per-round accuracies that feed the released reward EMA."""

import numpy as np
import pytest

from mtgrpo_jax.train.signals import GroupRecord, step_signals


def _records(seed, n=40, k=3, g=6, rounds=3):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        correct = rng.random(g) < rng.random()
        rewards = np.where(correct, 1.0, np.where(rng.random(g) < 0.5, 0.1, 0.0)).astype(np.float32)
        out.append(
            GroupRecord(
                int(rng.integers(0, k - 1)), int(rng.integers(0, rounds)), rewards, correct, bool(np.ptp(rewards) > 0)
            )
        )
    return out  # task k-1 is never generated


def test_signals_match_a_direct_loop():
    k = 3
    recs = _records(0, k=k)
    kept = [r for r in recs if r.accepted][:10]
    abs_adv = [float(np.abs(r.rewards - r.rewards.mean()).mean()) for r in kept]
    sig = step_signals(k, recs, [r.task_id for r in kept], abs_adv)
    for t in range(k):
        mine = [r for r in recs if r.task_id == t]
        if not mine:
            assert not sig.present[t] and sig.reward[t] == 0 and sig.generated[t] == 0
            assert np.all(np.isnan(sig.round_accuracy[:, t]))
            continue
        assert sig.present[t] and sig.generated[t] == len(mine)
        np.testing.assert_allclose(sig.reward[t], np.mean([r.rewards.mean() for r in mine]), rtol=1e-6)
        np.testing.assert_allclose(sig.accuracy[t], np.mean([r.correct.mean() for r in mine]), rtol=1e-6)
        np.testing.assert_allclose(sig.zero_grad_rate[t], np.mean([np.ptp(r.rewards) == 0 for r in mine]), rtol=1e-6)
        np.testing.assert_allclose(sig.filtered_rate[t], 1 - np.mean([r.accepted for r in mine]), rtol=1e-6)
        kept_t = [a for r, a in zip(kept, abs_adv) if r.task_id == t]
        np.testing.assert_allclose(sig.abs_advantage[t], np.mean(kept_t) if kept_t else 0.0, rtol=1e-6)
        assert sig.kept[t] == len(kept_t)
        for rnd in range(sig.round_accuracy.shape[0]):
            in_round = [r.correct.mean() for r in mine if r.round == rnd]
            if in_round:
                np.testing.assert_allclose(sig.round_accuracy[rnd, t], np.mean(in_round), rtol=1e-6)
            else:
                assert np.isnan(sig.round_accuracy[rnd, t])
    np.testing.assert_allclose(sig.share.sum(), 1.0, rtol=1e-6)


def test_sampler_counts_are_checked():
    recs = _records(1)
    kept = [r for r in recs if r.accepted]
    gen = np.bincount([r.task_id for r in recs], minlength=3)
    acc = np.bincount([r.task_id for r in recs if r.accepted], minlength=3)
    kept_counts = np.bincount([r.task_id for r in kept], minlength=3)
    step_signals(
        3,
        recs,
        [r.task_id for r in kept],
        [0.0] * len(kept),
        groups_generated=gen,
        accepted_generated=acc,
        kept_counts=kept_counts,
    )
    with pytest.raises(ValueError, match="groups_generated"):
        step_signals(3, recs, [r.task_id for r in kept], [0.0] * len(kept), groups_generated=gen + 1)
    with pytest.raises(ValueError, match="task ids must lie in"):
        step_signals(2, [GroupRecord(5, 0, np.ones(2), np.ones(2, bool), True)], [], [])


def test_no_groups_gives_zero_signals():
    sig = step_signals(2, [], [], [])
    assert not sig.present.any() and sig.round_accuracy.shape == (1, 2) and np.all(sig.share == 0)
