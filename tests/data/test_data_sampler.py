"""Batch samplers against a simulated generator whose acceptance (survival of the zero-gradient
filter) differs per task: 0.9 / 0.5 / 0.1, as Zebra / Countdown / ARC roughly do in the paper."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from mtgrpo_jax.data import (
    DynamicSampler,
    PlainSampler,
    RatioPreservingSampler,
    largest_remainder,
    make_sampler,
)

ACCEPT = np.array([0.9, 0.5, 0.1])
WEIGHTS = {
    "uniform": lambda t: np.full(3, 1 / 3),
    "hard_heavy": lambda t: np.array([0.2, 0.3, 0.5]),
    "drifting": lambda t: np.exp(np.sin(t / 20 + 2 * np.arange(3))) / np.exp(np.sin(t / 20 + 2 * np.arange(3))).sum(),
}


def make_generator(accept, seed=123):
    rng = np.random.default_rng(seed)
    calls = []

    def generate(task_ids):
        assert all(type(t) is int for t in task_ids)
        calls.append(list(task_ids))
        draws = rng.random(len(task_ids))
        return [(bool(u < accept[k]), (k, float(u))) for k, u in zip(task_ids, draws)]

    generate.rng, generate.calls = rng, calls
    return generate


def simulate(sampler, weights_fn, steps=200, accept=ACCEPT, seed=123):
    generate = make_generator(accept, seed)
    shares, zs, rounds, generated, results = [], [], [], [], []
    for t in range(steps):
        z = weights_fn(t)
        result = sampler.sample(z, generate)
        assert all(k == task for (k, _), task in zip(result.groups, result.task_ids))
        shares.append(result.shares)
        zs.append(z)
        rounds.append(result.rounds)
        generated.append(result.groups_generated.sum())
        results.append(result)
    shares, zs = np.array(shares), np.array(zs)
    return {
        "gap": float(np.abs(shares.mean(0) - zs.mean(0)).mean()),  # realised post-filter shares vs z
        "mean_shares": shares.mean(0),
        "mean_rounds": float(np.mean(rounds)),
        "mean_generated": float(np.mean(generated)),
        "results": results,
    }


@pytest.mark.parametrize("variant", ["paper", "released"])
@pytest.mark.parametrize("weights", sorted(WEIGHTS))
def test_ratio_preserving_shares_track_z_while_weighted_is_biased(variant, weights):
    rp = simulate(RatioPreservingSampler(3, 32, 8, variant=variant, seed=0), WEIGHTS[weights])
    wt = simulate(DynamicSampler(3, 32, 8, follow_weights=True, seed=0), WEIGHTS[weights])  # weights only
    print(
        f"\n[{variant}/{weights}] mean |share - z|: ratio-preserving {rp['gap']:.4f}, weighted {wt['gap']:.4f}; "
        f"shares rp {np.round(rp['mean_shares'], 3)} weighted {np.round(wt['mean_shares'], 3)}"
    )
    assert rp["gap"] < 0.03
    assert wt["gap"] > 0.1  # the weights-only sampler tilts towards the easy task
    for result in rp["results"]:
        assert result.num_groups == 32 and result.accepted.all() and not result.budget_exhausted
        if variant == "paper":
            assert np.array_equal(result.counts, result.targets)  # every step hits its Multinomial(B, z) draw


def test_weighted_sampler_shares_follow_weights_times_acceptance():
    z = np.array([0.2, 0.3, 0.5])
    wt = simulate(DynamicSampler(3, 32, 8, follow_weights=True, seed=0), lambda t: z)
    expected = z * ACCEPT / (z * ACCEPT).sum()
    assert np.allclose(wt["mean_shares"], expected, atol=0.03)


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_acceptance_aware_inflation_lowers_rounds(variant):
    figures = {}
    for aware in (True, False):
        runs = [
            simulate(
                RatioPreservingSampler(3, 32, 8, variant=variant, acceptance_aware=aware, seed=s),
                WEIGHTS["uniform"],
                seed=100 + s,
            )
            for s in range(3)
        ]
        figures[aware] = (np.mean([r["mean_rounds"] for r in runs]), np.mean([r["mean_generated"] for r in runs]))
    print(
        f"\n[{variant}] mean resampling rounds: with inflation {figures[True][0]:.3f}, without {figures[False][0]:.3f}; "
        f"groups generated per step {figures[True][1]:.1f} vs {figures[False][1]:.1f}"
    )
    assert figures[True][0] < figures[False][0] - 0.1
    assert figures[True][1] < figures[False][1]


def test_rho_tracks_filter_rates():
    sampler = RatioPreservingSampler(3, 32, 8, seed=0)
    simulate(sampler, WEIGHTS["uniform"], steps=100)
    assert np.allclose(sampler.rho, 1 - ACCEPT, atol=0.08)
    assert np.allclose(sampler.inflation(), [1 / 0.9, 2.0, 5.0], atol=0.35)  # 1/0.1 = 10 capped at M_acc = 5


def test_spent_budget_returns_smaller_batch_and_metric():
    # one task never survives the filter: its deficit cannot be met; the batch is topped up from the
    # other tasks' surplus when there is one (Algorithm 2, lines 27-33)
    for seed in range(5):
        sampler = RatioPreservingSampler(3, 16, 4, resample_budget=3, seed=seed)
        result = sampler.sample(np.full(3, 1 / 3), make_generator([0.9, 0.5, 0.0], seed=seed))
        assert result.budget_exhausted and result.rounds == 3 and result.generate_calls == 4
        assert result.counts[2] == 0 and result.groups_generated[2] > result.targets[2]
        assert result.num_groups == min(16, result.accepted_generated.sum())
    # nearly everything filtered: fewer than B accepted groups come back, without an exception
    sampler = RatioPreservingSampler(3, 16, 4, resample_budget=1, seed=0)
    result = sampler.sample(np.full(3, 1 / 3), make_generator([0.05, 0.05, 0.0]))
    assert result.budget_exhausted and 0 < result.num_groups < 16
    metrics = result.metrics(["zebra", "countdown", "arc"])
    assert metrics["sampler/budget_exhausted"] == 1.0 and metrics["sampler/batch_fill"] < 1.0
    # nothing accepted at all
    for sampler in (
        RatioPreservingSampler(3, 8, seed=0),
        DynamicSampler(3, 8, resample_budget=2, seed=0),
        DynamicSampler(3, 8, resample_budget=2, follow_weights=True, seed=0),
    ):
        result = sampler.sample(np.full(3, 1 / 3), make_generator([0.0, 0.0, 0.0]))
        assert result.num_groups == 0 and result.budget_exhausted and np.all(result.shares == 0)
        assert result.metrics()["sampler/num_groups"] == 0.0


# Every `sampler.kind`; dynamic with the task weights is the weights-only ablation.
KINDS = [("ratio_preserving", {}), ("plain", {}), ("dynamic", {}), ("dynamic", {"follow_weights": True})]


@pytest.mark.parametrize("kind,options", KINDS)
def test_seeded_runs_identical(kind, options):
    def trace(seed):
        sampler = make_sampler(kind, 3, 16, 4, seed=seed, **options)
        out = simulate(sampler, WEIGHTS["drifting"], steps=30, seed=7)
        return [(r.task_ids.tolist(), r.rounds, r.groups) for r in out["results"]]

    assert trace(5) == trace(5)
    assert trace(5) != trace(6)


@pytest.mark.parametrize("kind,options", KINDS)
def test_state_round_trips(kind, options):
    sampler = make_sampler(kind, 3, 16, 4, seed=1, **options)
    generate = make_generator(ACCEPT, seed=9)
    for t in range(10):
        sampler.sample(WEIGHTS["drifting"](t), generate)
    state = json.loads(json.dumps(sampler.get_state()))
    generator_state = copy.deepcopy(generate.rng.bit_generator.state)
    expected = [sampler.sample(WEIGHTS["drifting"](t), generate) for t in range(10, 15)]

    restored = make_sampler(kind, 3, 16, 4, seed=999, **options)
    restored.set_state(state)
    generate.rng.bit_generator.state = generator_state
    again = [restored.sample(WEIGHTS["drifting"](t), generate) for t in range(10, 15)]
    for a, b in zip(expected, again):
        assert a.task_ids.tolist() == b.task_ids.tolist() and a.groups == b.groups and a.rounds == b.rounds
        if a.rho is not None:
            assert np.array_equal(a.rho, b.rho)
    with pytest.raises(ValueError, match="kind"):
        make_sampler("dynamic" if kind != "dynamic" else "plain", 3, 16).set_state(state)
    with pytest.raises(ValueError, match="tasks"):
        make_sampler(kind, 4, 16, **options).set_state(state)


def test_state_of_the_plain_sampler_under_its_old_kind_name_restores():
    sampler = PlainSampler(3, 16, 4, follow_weights=True, seed=1)
    sampler.sample(WEIGHTS["drifting"](0), make_generator(ACCEPT))
    state = {**sampler.get_state(), "kind": "uniform"}  # as checkpoints before the rename hold it
    restored = PlainSampler(3, 16, 4, follow_weights=True, seed=2)
    restored.set_state(state)
    assert (
        restored.sample(WEIGHTS["drifting"](1), make_generator(ACCEPT)).task_ids.tolist()
        == sampler.sample(WEIGHTS["drifting"](1), make_generator(ACCEPT)).task_ids.tolist()
    )


def test_plain_sampler_returns_everything_generated():
    sampler = PlainSampler(3, 64, 8, seed=0)
    generate = make_generator(ACCEPT)
    result = sampler.sample(np.array([1.0, 0.0, 0.0]), generate)  # GRPO ignores the weights
    assert result.num_groups == 64 and len(generate.calls) == 1 and result.rounds == 0
    assert 0 < result.accepted.sum() < 64 and np.all(result.counts > 0)
    follow = PlainSampler(3, 64, 8, follow_weights=True, seed=0).sample(np.array([1.0, 0.0, 0.0]), generate)
    assert follow.counts.tolist() == [64, 0, 0]


def test_dynamic_sampling_refills_until_batch_is_full():
    sampler = DynamicSampler(3, 32, 8, oversample=1.0, resample_budget=10, seed=0)
    generate = make_generator([0.3, 0.3, 0.3])
    result = sampler.sample(np.array([0.0, 0.0, 1.0]), generate)  # DAPO ignores the weights
    assert result.num_groups == 32 and result.accepted.all() and result.rounds >= 2
    assert all(len(call) == 32 for call in generate.calls)
    assert np.all(result.counts > 0)


def test_released_variant_draws_inflated_tasks_at_random():
    """The release's efficient sampling (priority_decay.py `sample_arms_efficient_sampling`, non-deterministic
    branch): the targets come from one draw on z, the generated tasks from a second np.random.choice on
    z * m / sum; with acceptance-aware sampling off, both are the same draw."""
    m = np.array([1.0, 2.0, 5.0])
    q = m / m.sum()
    firsts = []
    for seed in range(300):
        sampler = RatioPreservingSampler(3, 10, 1, oversample=3.0, variant="released", seed=seed)
        sampler.rho[:] = [0.0, 0.5, 0.8]  # inflation 1, 2, 5
        generate = make_generator([1.0, 1.0, 1.0])
        sampler.sample(np.full(3, 1 / 3), generate)
        firsts.append(np.bincount(generate.calls[0], minlength=3))
    firsts = np.array(firsts)
    assert np.all(firsts.sum(1) == 30) and len({tuple(f) for f in firsts}) > 20  # random, not apportioned
    # multinomial(30, q): mean 30 q, standard error of the mean sqrt(30 q (1 - q) / 300)
    se = np.sqrt(30 * q * (1 - q) / len(firsts))
    assert np.all(np.abs(firsts.mean(0) - 30 * q) < 4 * se), (firsts.mean(0), 30 * q)
    off = RatioPreservingSampler(3, 10, 1, oversample=3.0, variant="released", acceptance_aware=False, seed=1)
    off.rho[:] = [0.0, 0.5, 0.8]
    generate = make_generator([1.0, 1.0, 1.0])
    result = off.sample(np.full(3, 1 / 3), generate)
    first = np.bincount(generate.calls[0], minlength=3)
    np.testing.assert_array_equal(result.targets, np.rint(first / 3.0))  # targets from the generated draw itself


def test_preserve_ratio_off_refills_to_b_without_targets():
    sampler = RatioPreservingSampler(3, 8, 1, oversample=1.0, resample_budget=5, seed=0)
    generate = make_generator([0.5, 0.5, 0.5])
    result = sampler.sample(np.array([0.8, 0.1, 0.1]), generate, preserve_ratio=False)
    assert result.num_groups == 8 and np.all(result.targets == 0) and not result.budget_exhausted


def test_released_variant_deterministic_inflation_uses_largest_remainder_apportionment():
    sampler = RatioPreservingSampler(3, 10, 1, oversample=3.0, variant="released", deterministic_inflation=True, seed=0)
    sampler.rho[:] = [0.0, 0.5, 0.9]  # inflation 1, 2, 5
    generate = make_generator([1.0, 1.0, 1.0])
    result = sampler.sample(np.full(3, 1 / 3), generate)
    first = np.bincount(generate.calls[0], minlength=3)
    assert first.sum() == 30 and first[2] > first[1] > first[0]
    assert result.num_groups == 10 and abs(result.targets.sum() - 10) <= 2


def test_largest_remainder():
    rng = np.random.default_rng(0)
    for _ in range(100):
        shares, total = rng.random(5), int(rng.integers(1, 50))
        counts = largest_remainder(shares, total)
        assert counts.sum() == total and np.all(np.abs(counts - shares / shares.sum() * total) < 1)


def test_bad_inputs_raise_clear_errors():
    sampler = RatioPreservingSampler(3, 8, seed=0)
    good = make_generator(ACCEPT)
    for weights, match in [
        ([0.5, 0.5], "shape"),
        ([1, -1, 1], "non-negative"),
        ([0, 0, 0], "not all zero"),
        ([np.nan, 1, 1], "finite"),
        (None, "required"),
    ]:
        with pytest.raises(ValueError, match=match):
            sampler.sample(weights, good)
    with pytest.raises(ValueError, match="returned 1 results"):
        sampler.sample(np.full(3, 1 / 3), lambda ids: [(True, None)])
    with pytest.raises(ValueError, match="pairs"):
        sampler.sample(np.full(3, 1 / 3), lambda ids: [True] * len(ids))
    for kwargs, match in [
        ({"batch_size": 0}, "batch_size"),
        ({"oversample": 0}, "oversample"),
        ({"acceptance_cap": 0.5}, "acceptance_cap"),
        ({"variant": "mine"}, "variant"),
        ({"rho_decay": 1.0}, "rho_decay"),
        ({"resample_budget": -1}, "resample_budget"),
    ]:
        with pytest.raises(ValueError, match=match):
            RatioPreservingSampler(**{"num_tasks": 3, "batch_size": 8, **kwargs})
    with pytest.raises(ValueError, match="unknown sampler kind"):
        make_sampler("mine", 3, 8)
    with pytest.raises(ValueError, match="unexpected keyword"):
        make_sampler("plain", 3, 8, acceptance_cap=2.0)


def test_metrics_are_flat_scalars():
    result = RatioPreservingSampler(3, 16, 4, seed=0).sample(np.full(3, 1 / 3), make_generator(ACCEPT))
    metrics = result.metrics(["zebra", "countdown", "arc"])
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["sampler/rollouts_generated"] == 4 * result.groups_generated.sum()
    for key in ("share/arc", "target_share/arc", "rho/arc", "inflation/arc", "acceptance/arc", "rounds", "share_gap"):
        assert f"sampler/{key}" in metrics
    assert metrics["sampler/share_gap"] == 0.0
