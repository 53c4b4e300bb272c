"""Batch construction: the ratio-preserving sampler (the paper's Algorithm 2) and the plain samplers
of the baselines, all behind one model-independent interface:

    result = sampler.sample(weights, generate)

`generate(task_ids)` receives one task index per requested group (prompt), grouped by task in
ascending order; it pulls the prompts, rolls out G completions each, scores them, and returns one
`(accepted, payload)` per group, in the same order, where `accepted` means the group survives the
zero-gradient filter. It is called once per round. The sampler decides how many groups of
each task to request, in how many rounds, and which accepted groups form the batch.

Why ratio preservation: the zero-gradient filter removes far more groups of some tasks than of
others (ARC loses many more than Zebra), so a batch drawn in proportion to z and then filtered no
longer has proportions z. Algorithm 2 draws the post-filter counts n ~ Multinomial(B, z) first,
oversamples with acceptance-aware inflation m_k = min(1 / (1 - rho_k), M_acc), resamples the
deficits for at most N_rs rounds, then keeps at most n_k groups per task and tops up to B.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

GenerateFn = Callable[[list[int]], Sequence[tuple[bool, Any]]]

_STATE_VERSION = 1
# Checkpoints written before the classes took the config's kind names call the plain sampler "uniform".
_OLD_KINDS = {"uniform": "plain"}


@dataclasses.dataclass
class SampleResult:
    """One step's batch and what it cost.

    groups: payloads of the groups that form the batch (at most batch_size; all accepted except for
      PlainSampler, which returns everything it generated and leaves filtering to the trainer).
    task_ids / accepted: per returned group.
    counts, shares: per task, over the returned groups (shares sum to 1 unless empty).
    targets: per task, the desired post-filter counts (Algorithm 2's n_k; the expected counts
      B * p for the plain samplers).
    rounds: resampling rounds after the first generation (generate was called rounds + 1 times).
    groups_generated, accepted_generated: per task, over every round.
    budget_exhausted: the deficits (or, for refill samplers, the batch) were still unmet when the
      resample budget ran out; the batch is then smaller than asked or off-ratio.
    """

    groups: list[Any]
    task_ids: np.ndarray
    accepted: np.ndarray
    counts: np.ndarray
    shares: np.ndarray
    targets: np.ndarray
    batch_size: int
    group_size: int
    rounds: int
    groups_generated: np.ndarray
    accepted_generated: np.ndarray
    budget_exhausted: bool
    weights: np.ndarray
    inflation: np.ndarray
    rho: np.ndarray | None = None

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def generate_calls(self) -> int:
        return self.rounds + 1

    @property
    def target_shares(self) -> np.ndarray:
        total = float(self.targets.sum())
        return self.targets / total if total > 0 else np.zeros_like(self.targets, dtype=float)

    def metrics(self, names: Sequence[str] | None = None, prefix: str = "sampler/") -> dict[str, float]:
        """Flat scalar metrics for a metrics sink."""
        k = len(self.counts)
        names = list(names) if names is not None else [str(i) for i in range(k)]
        if len(names) != k:
            raise ValueError(f"metrics: {len(names)} names for {k} tasks")
        generated = float(self.groups_generated.sum())
        out = {
            f"{prefix}rounds": float(self.rounds),
            f"{prefix}generate_calls": float(self.generate_calls),
            f"{prefix}budget_exhausted": float(self.budget_exhausted),
            f"{prefix}num_groups": float(self.num_groups),
            f"{prefix}batch_fill": self.num_groups / self.batch_size,
            f"{prefix}groups_generated": generated,
            f"{prefix}rollouts_generated": generated * self.group_size,
            f"{prefix}acceptance_rate": float(self.accepted_generated.sum()) / generated if generated else 0.0,
            f"{prefix}share_gap": float(np.abs(self.shares - self.target_shares).mean()),
        }
        for i, name in enumerate(names):
            gen = float(self.groups_generated[i])
            out[f"{prefix}share/{name}"] = float(self.shares[i])
            out[f"{prefix}target_share/{name}"] = float(self.target_shares[i])
            out[f"{prefix}weight/{name}"] = float(self.weights[i])
            out[f"{prefix}generated/{name}"] = gen
            if gen:  # undefined for a task that was not generated this step
                out[f"{prefix}acceptance/{name}"] = float(self.accepted_generated[i]) / gen
            out[f"{prefix}inflation/{name}"] = float(self.inflation[i])
            if self.rho is not None:
                out[f"{prefix}rho/{name}"] = float(self.rho[i])
        return out


def largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to `total` closest to `shares * total` (Hamilton's method)."""
    shares = np.asarray(shares, dtype=np.float64)
    expected = shares / shares.sum() * total
    counts = np.floor(expected).astype(np.int64)
    remainder = int(total - counts.sum())
    if remainder > 0:
        order = np.argsort(-(expected - counts), kind="stable")
        counts[order[:remainder]] += 1
    return counts


class _Round:
    """Accumulates accepted groups over the rounds of one step, in generation order."""

    def __init__(self, num_tasks: int):
        self.payloads: list[Any] = []
        self.task_ids: list[int] = []
        self.accepted: list[bool] = []
        self.generated = np.zeros(num_tasks, dtype=np.int64)
        self.accepted_per_task = np.zeros(num_tasks, dtype=np.int64)

    def add(self, task_ids: np.ndarray, results: Sequence[tuple[bool, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """Record one round; returns (generated, accepted) per task for this round only."""
        k = len(self.generated)
        gen = np.bincount(task_ids, minlength=k)
        acc = np.zeros(k, dtype=np.int64)
        for task, (ok, payload) in zip(task_ids.tolist(), results):
            self.payloads.append(payload)
            self.task_ids.append(task)
            self.accepted.append(bool(ok))
            acc[task] += bool(ok)
        self.generated += gen
        self.accepted_per_task += acc
        return gen, acc


class _Sampler:
    """Shared validation, RNG and state handling."""

    kind = ""

    def __init__(self, num_tasks: int, batch_size: int, group_size: int = 1, seed: int = 0):
        for label, value in (("num_tasks", num_tasks), ("batch_size", batch_size), ("group_size", group_size)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{type(self).__name__}: {label} must be a positive integer, got {value!r}")
        self.num_tasks = int(num_tasks)
        self.batch_size = int(batch_size)
        self.group_size = int(group_size)
        self.seed = int(seed)
        self._rng = np.random.default_rng(self.seed)

    def _set_rounds(self, oversample: float, resample_budget: int) -> None:
        """The refilling samplers' round size factor M_os and resampling budget N_rs, checked."""
        if not oversample > 0:
            raise ValueError(f"oversample must be positive, got {oversample}")
        if int(resample_budget) != resample_budget or resample_budget < 0:
            raise ValueError(f"resample_budget must be a non-negative integer, got {resample_budget}")
        self.oversample = float(oversample)
        self.resample_budget = int(resample_budget)

    @property
    def groups_per_round(self) -> int:
        """round(M_os x B) groups per generation round, at least one (the samplers that `_set_rounds`)."""
        return max(1, int(round(self.oversample * self.batch_size)))

    def _weights(self, weights: Any) -> np.ndarray:
        if weights is None:
            raise ValueError(f"{type(self).__name__}.sample: weights are required")
        z = np.asarray(weights, dtype=np.float64).reshape(-1)
        if z.shape != (self.num_tasks,):
            raise ValueError(f"weights must have shape ({self.num_tasks},), got {np.shape(weights)}")
        if not np.all(np.isfinite(z)) or np.any(z < 0) or z.sum() <= 0:
            raise ValueError(f"weights must be finite, non-negative and not all zero, got {z.tolist()}")
        return z / z.sum()

    def _call(self, generate: GenerateFn, task_ids: np.ndarray) -> list[tuple[bool, Any]]:
        results = list(generate([int(t) for t in task_ids]))
        if len(results) != len(task_ids):
            raise ValueError(f"generate returned {len(results)} results for {len(task_ids)} requested groups")
        for item in results:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise ValueError(f"generate must return (accepted, payload) pairs, got {type(item).__name__}")
        return results

    def _ids(self, counts: np.ndarray) -> np.ndarray:
        return np.repeat(np.arange(self.num_tasks), counts)

    def _result(
        self,
        acc: _Round,
        keep: list[int],
        targets: np.ndarray,
        rounds: int,
        exhausted: bool,
        z: np.ndarray,
        inflation: np.ndarray,
        rho: np.ndarray | None = None,
    ) -> SampleResult:
        keep = sorted(keep)  # generation order
        task_ids = np.asarray([acc.task_ids[i] for i in keep], dtype=np.int64)
        counts = np.bincount(task_ids, minlength=self.num_tasks).astype(np.int64)
        shares = counts / counts.sum() if counts.sum() else np.zeros(self.num_tasks)
        return SampleResult(
            groups=[acc.payloads[i] for i in keep],
            task_ids=task_ids,
            accepted=np.asarray([acc.accepted[i] for i in keep], dtype=bool),
            counts=counts,
            shares=shares,
            targets=np.asarray(targets, dtype=np.float64),
            batch_size=self.batch_size,
            group_size=self.group_size,
            rounds=int(rounds),
            groups_generated=acc.generated.copy(),
            accepted_generated=acc.accepted_per_task.copy(),
            budget_exhausted=bool(exhausted),
            weights=z,
            inflation=np.asarray(inflation, dtype=np.float64),
            rho=None if rho is None else rho.copy(),
        )

    # --- state -----------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _set_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state (the RNG state is nested JSON text: its integers exceed 64 bits)."""
        return {
            "version": _STATE_VERSION,
            "kind": self.kind,
            "num_tasks": self.num_tasks,
            "rng": json.dumps(self._rng.bit_generator.state),
            **self._extra_state(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        kind = _OLD_KINDS.get(state.get("kind"), state.get("kind"))
        if state.get("version") != _STATE_VERSION or kind != self.kind:
            raise ValueError(
                f"{type(self).__name__}.set_state: state is for kind {state.get('kind')!r} "
                f"v{state.get('version')}, expected {self.kind!r} v{_STATE_VERSION}"
            )
        if int(state.get("num_tasks", -1)) != self.num_tasks:
            raise ValueError(f"set_state: state has {state.get('num_tasks')} tasks, sampler has {self.num_tasks}")
        rng = np.random.default_rng()
        rng.bit_generator.state = json.loads(state["rng"])
        self._set_extra_state(state)
        self._rng = rng


class RatioPreservingSampler(_Sampler):
    """Algorithm 2 (RP sampler). Keeps per-task filter-rate estimates rho (exponential moving
    averages of each task's zero-gradient fraction, updated after every generation round).

    Args:
      oversample (M_os): each round requests round(M_os * B) groups.
      resample_budget (N_rs): resampling rounds after the first generation.
      acceptance_cap (M_acc): cap on the inflation factor m_k = 1 / max(1 - rho_k, min_acceptance).
      acceptance_aware: False sets m_k = 1 (the "without acceptance-aware sampling" ablation).
      variant: "paper" (Algorithm 2 as written: n ~ Multinomial(B, z), generation counts
        ~ Multinomial(M_os B, z*m / sum), resampling ~ Multinomial(M_os B, def*m / sum)) or
        "released" (the released code, utils/auto_curriculum/priority_decay.py
        `sample_arms_efficient_sampling`: draw M_os*B tasks from z, target round(count / M_os); the
        generated tasks are a second, independent `np.random.choice` on z*m / sum (the same draw as the
        targets when acceptance_aware is off), resampling rounds draw from def*m / sum; it also keeps
        generating while fewer than B groups are accepted).
      deterministic_inflation: released variant only: largest-remainder apportionment of the drawn
        counts times m instead of the random draw (the release's `efficient_sampling.deterministic`).

    `sample(..., preserve_ratio=False)` drops the per-task targets for that step: rounds refill until B
    groups are accepted and B of them are kept at random (the release before `ensure_famo_ratio_from`).
    """

    kind = "ratio_preserving"

    def __init__(
        self,
        num_tasks: int,
        batch_size: int,
        group_size: int = 1,
        *,
        oversample: float = 3.0,
        resample_budget: int = 10,
        acceptance_cap: float = 5.0,
        rho_decay: float = 0.9,
        min_acceptance: float = 0.01,
        acceptance_aware: bool = True,
        variant: str = "paper",
        deterministic_inflation: bool = False,
        rho_init: float = 0.0,
        seed: int = 0,
    ):
        super().__init__(num_tasks, batch_size, group_size, seed)
        self._set_rounds(oversample, resample_budget)
        if not acceptance_cap >= 1:
            raise ValueError(f"acceptance_cap must be >= 1, got {acceptance_cap}")
        if not 0 <= rho_decay < 1:
            raise ValueError(f"rho_decay must be in [0, 1), got {rho_decay}")
        if not 0 < min_acceptance <= 1:
            raise ValueError(f"min_acceptance must be in (0, 1], got {min_acceptance}")
        if variant not in ("paper", "released"):
            raise ValueError(f"variant must be 'paper' or 'released', got {variant!r}")
        if not 0 <= rho_init < 1:
            raise ValueError(f"rho_init must be in [0, 1), got {rho_init}")
        self.acceptance_cap = float(acceptance_cap)
        self.rho_decay = float(rho_decay)
        self.min_acceptance = float(min_acceptance)
        self.acceptance_aware = bool(acceptance_aware)
        self.variant = variant
        self.deterministic_inflation = bool(deterministic_inflation)
        self.rho = np.full(self.num_tasks, float(rho_init))

    def inflation(self) -> np.ndarray:
        """m_k = min(1 / max(1 - rho_k, min_acceptance), M_acc)."""
        if not self.acceptance_aware:
            return np.ones(self.num_tasks)
        acceptance = np.maximum(1.0 - self.rho, self.min_acceptance)
        return np.minimum(1.0 / acceptance, self.acceptance_cap)

    def _update_rho(self, generated: np.ndarray, accepted: np.ndarray) -> None:
        seen = generated > 0
        filtered = 1.0 - accepted[seen] / generated[seen]
        self.rho[seen] = self.rho_decay * self.rho[seen] + (1.0 - self.rho_decay) * filtered

    def _round_counts(self, probs: np.ndarray) -> np.ndarray:
        m = self.inflation()
        total = self.groups_per_round
        if self.variant == "released" and self.deterministic_inflation:
            drawn = self._rng.multinomial(total, probs)
            return largest_remainder(drawn * m, total)
        q = probs * m
        return self._rng.multinomial(total, q / q.sum())

    def sample(self, weights: Any, generate: GenerateFn, *, preserve_ratio: bool = True) -> SampleResult:
        z = self._weights(weights)
        b, k = self.batch_size, self.num_tasks
        first_inflation = self.inflation()
        if self.variant == "paper":
            targets = self._rng.multinomial(b, z)
            counts = self._round_counts(z)
        else:
            drawn = self._rng.multinomial(self.groups_per_round, z)
            targets = np.rint(drawn / self.oversample).astype(np.int64)
            if self.deterministic_inflation:
                counts = largest_remainder(drawn * first_inflation, self.groups_per_round)
            elif self.acceptance_aware:
                counts = self._round_counts(z)
            else:
                counts = drawn
        if not preserve_ratio:
            targets = np.zeros(k, dtype=np.int64)

        acc = _Round(k)
        rounds = 0
        while True:
            ids = self._ids(counts)
            gen, ok = acc.add(ids, self._call(generate, ids))
            self._update_rho(gen, ok)
            deficit = np.maximum(targets - acc.accepted_per_task, 0)
            refill = self.variant == "released" or not preserve_ratio
            short = deficit.sum() > 0 or (refill and acc.accepted_per_task.sum() < b)
            if not short or rounds >= self.resample_budget:
                break
            rounds += 1
            probs = deficit / deficit.sum() if deficit.sum() > 0 else z
            counts = self._round_counts(probs)
        exhausted = bool(short)
        keep = self._select(acc, targets)
        return self._result(acc, keep, targets, rounds, exhausted, z, first_inflation, self.rho)

    def _select(self, acc: _Round, targets: np.ndarray) -> list[int]:
        """Lines 27-33: everything if at most B were accepted; else at most n_k per task, topped up
        to B with a uniform draw from the rest."""
        accepted = [i for i, ok in enumerate(acc.accepted) if ok]
        b = self.batch_size
        if len(accepted) <= b:
            return accepted
        taken = np.zeros(self.num_tasks, dtype=np.int64)
        core, rest = [], []
        for i in accepted:
            task = acc.task_ids[i]
            if taken[task] < targets[task]:
                taken[task] += 1
                core.append(i)
            else:
                rest.append(i)
        if len(core) > b:  # only the released variant's rounded targets can overshoot B
            core = sorted(self._rng.choice(core, size=b, replace=False).tolist())
            return core
        fill = b - len(core)
        if fill:
            core += self._rng.choice(rest, size=fill, replace=False).tolist()
        return core

    def _extra_state(self) -> dict[str, Any]:
        return {"rho": [float(x) for x in self.rho]}

    def _set_extra_state(self, state: dict[str, Any]) -> None:
        rho = np.asarray(state["rho"], dtype=np.float64)
        if rho.shape != (self.num_tasks,):
            raise ValueError(f"set_state: rho has shape {rho.shape}, expected ({self.num_tasks},)")
        self.rho = rho


class PlainSampler(_Sampler):
    """GRPO: B groups with tasks drawn uniformly (or from the weights with follow_weights=True, as
    the trainer does: uniform weights give GRPO, the SEC curriculum's give SEC-GRPO), one generation,
    no refill. Every generated group is returned with its `accepted` flag; the trainer applies its own
    filter."""

    kind = "plain"

    def __init__(
        self, num_tasks: int, batch_size: int, group_size: int = 1, *, follow_weights: bool = False, seed: int = 0
    ):
        super().__init__(num_tasks, batch_size, group_size, seed)
        self.follow_weights = bool(follow_weights)

    def _probs(self, weights: Any) -> np.ndarray:
        if self.follow_weights:
            return self._weights(weights)
        return np.full(self.num_tasks, 1.0 / self.num_tasks)

    def sample(self, weights: Any, generate: GenerateFn) -> SampleResult:
        p = self._probs(weights)
        counts = self._rng.multinomial(self.batch_size, p)
        acc = _Round(self.num_tasks)
        ids = self._ids(counts)
        acc.add(ids, self._call(generate, ids))
        return self._result(acc, list(range(len(ids))), self.batch_size * p, 0, False, p, np.ones(self.num_tasks))


class DynamicSampler(PlainSampler):
    """DAPO dynamic sampling: rounds of round(M_os * B) groups with tasks drawn uniformly (or from
    the weights with follow_weights=True, as the trainer does: uniform weights give DAPO, adaptive ones
    the weights-only ablation), accepted groups accumulated until B are collected or the resample budget
    is spent; B of the accepted groups, drawn uniformly, form the batch. No ratio preservation: the
    filtered batch keeps whatever proportions survive."""

    kind = "dynamic"

    def __init__(
        self,
        num_tasks: int,
        batch_size: int,
        group_size: int = 1,
        *,
        oversample: float = 3.0,
        resample_budget: int = 10,
        follow_weights: bool = False,
        seed: int = 0,
    ):
        super().__init__(num_tasks, batch_size, group_size, follow_weights=follow_weights, seed=seed)
        self._set_rounds(oversample, resample_budget)

    def sample(self, weights: Any, generate: GenerateFn) -> SampleResult:
        p = self._probs(weights)
        per_round = self.groups_per_round
        acc = _Round(self.num_tasks)
        rounds = 0
        while True:
            ids = self._ids(self._rng.multinomial(per_round, p))
            acc.add(ids, self._call(generate, ids))
            if acc.accepted_per_task.sum() >= self.batch_size or rounds >= self.resample_budget:
                break
            rounds += 1
        accepted = [i for i, ok in enumerate(acc.accepted) if ok]
        exhausted = len(accepted) < self.batch_size
        keep = accepted
        if len(accepted) > self.batch_size:  # a uniform subset: generation order is sorted by task
            keep = self._rng.choice(accepted, size=self.batch_size, replace=False).tolist()
        return self._result(acc, keep, self.batch_size * p, rounds, exhausted, p, np.ones(self.num_tasks))


# The config's `sampler.kind` names, which are also each class's `kind`.
_KINDS: dict[str, type[_Sampler]] = {cls.kind: cls for cls in (RatioPreservingSampler, PlainSampler, DynamicSampler)}


def make_sampler(kind: str, num_tasks: int, batch_size: int, group_size: int = 1, **kwargs: Any) -> _Sampler:
    """Build a sampler by name (`sampler.kind`): ratio_preserving, plain or dynamic; kwargs go to the
    class. The one way the trainer makes its sampler (`train.setup.build_sampler`)."""
    try:
        cls = _KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown sampler kind {kind!r}; choose from {sorted(_KINDS)}") from None
    try:
        return cls(num_tasks, batch_size, group_size, **kwargs)
    except TypeError as err:
        raise ValueError(f"sampler {kind!r}: {err}") from None
