"""`mtgrpo report RUN_DIR [RUN_DIR ...] --out DIR`: plots and a comparison table from run directories.

Figures in the spirit of the paper's Figure 6, one panel per run:
  eval_accuracy.png       per-task evaluation accuracy over steps, with worst-task and average
  weights_vs_shares.png   task weights z_k (solid) against the realised post-filter batch shares (dashed)
  zero_gradient_rates.png per-task fraction of zero-gradient groups over steps
and a table (comparison.md, comparison.csv; report.md gathers table, figures and notes): final
worst-task and average accuracy, best worst-task accuracy, average relative change against the first
run, and steps (hours) until worst-task accuracy first reached each threshold.

Runs that lack some metrics still get a report: the panel says what is missing and report.md notes it.
Plotting goes through matplotlib's object API with the Agg canvas, so it never touches pyplot's global
state or needs a display, and is safe to call from inside the trainer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mtgrpo_jax.train.eval_metrics import (
    EvalHistory,
    eval_history,
    relative_change,
    steps_to_thresholds,
)
from mtgrpo_jax.train.metrics import is_eval, per_task, read_metrics

DEFAULT_THRESHOLDS = (0.2, 0.3, 0.4, 0.5)
MISSING = "—"


@dataclass
class Run:
    label: str
    run_dir: Path
    train: list[dict]
    history: EvalHistory
    notes: list[str] = field(default_factory=list)

    def series(self, suffix: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Steps and per-task values of `task/<name>/<suffix>` over the training records (NaN where a
        record lacks the task; the later record wins if a step repeats)."""
        by_step: dict[int, dict] = {}
        for rec in self.train:
            by_step[rec["step"]] = rec
        steps = sorted(by_step)
        names: list[str] = []
        for s in steps:
            names += [n for n in per_task(by_step[s], suffix) if n not in names]
        values = {n: np.full(len(steps), np.nan) for n in names}
        for j, s in enumerate(steps):
            for n, v in per_task(by_step[s], suffix).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    values[n][j] = float(v)
        return np.array(steps, dtype=np.int64), values


def load_run(run_dir: str | os.PathLike, label: str | None = None) -> Run:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run directory not found: {run_dir}")
    records = read_metrics(run_dir)  # raises a one-line ValueError when metrics.jsonl is missing
    run = Run(
        label or run_dir.resolve().name,
        run_dir,
        [r for r in records if not is_eval(r)],
        eval_history(records),
    )
    if not records:
        run.notes.append("metrics.jsonl is empty")
    return run


def _unique_labels(run_dirs: Sequence[Path], labels: Sequence[str] | None) -> list[str]:
    if labels is not None:
        if len(labels) != len(run_dirs):
            raise ValueError(f"got {len(labels)} labels for {len(run_dirs)} run directories")
        return list(labels)
    out: list[str] = []
    for d in run_dirs:
        base = Path(d).resolve().name or str(d)
        label, i = base, 2
        while label in out:
            label, i = f"{base}#{i}", i + 1
        out.append(label)
    return out


# ----------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------


def _task_colors(runs: Sequence[Run]) -> dict[str, Any]:
    """One colour per task name across every panel and figure, so a task is recognisable throughout."""
    from matplotlib import colormaps

    names: list[str] = []
    for run in runs:
        names += [n for n in run.history.accuracy if n not in names]
        for suffix in ("weight", "share", "zero_grad_rate", "accuracy"):
            names += [n for n in run.series(suffix)[1] if n not in names]
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def _figure(n_panels: int):
    from matplotlib.figure import Figure

    ncols = min(n_panels, 3)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.6 * nrows), dpi=110, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _label_panel(
    ax, title: str, ylabel: str, *, ylim: tuple[float, float | None] | None = (-0.02, 1.02), legend: bool = True
) -> None:
    """What every panel of the report shares: its title, the step axis, a y label and range, a grid and
    (unless the caller draws its own) the legend of its lines."""
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7, loc="best")


def _save(fig, axes, title: str, path: Path) -> None:
    """Integer step ticks on every panel, the figure's title, and the file."""
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.savefig(path)


def _empty_panel(ax, title: str, message: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_axis_off()


def plot_eval_accuracy(runs: Sequence[Run], path: Path, colors: dict[str, Any], notes: list[str]) -> bool:
    if not any(run.history.steps.size for run in runs):
        notes.append("eval_accuracy.png not written: no run has evaluation records")
        return False
    fig, axes = _figure(len(runs))
    for ax, run in zip(axes, runs):
        h = run.history
        if h.steps.size == 0:
            _empty_panel(ax, run.label, "no evaluation records")
            notes.append(f"{run.label}: no evaluation records (accuracy panel empty)")
            continue
        for name, acc in h.accuracy.items():
            ax.plot(h.steps, acc, marker="o", ms=3, lw=1.4, color=colors[name], label=name)
        # Wide and translucent, so the task line it coincides with stays visible underneath.
        ax.plot(h.steps, h.worst, color="black", lw=4, alpha=0.3, zorder=1, label="worst task")
        ax.plot(h.steps, h.mean, color="0.45", lw=1.6, ls=":", label="average")
        _label_panel(ax, run.label, "eval accuracy")
    _save(fig, axes, "Per-task evaluation accuracy", path)
    return True


def plot_weights_vs_shares(runs: Sequence[Run], path: Path, colors: dict[str, Any], notes: list[str]) -> bool:
    data = [(run, run.series("weight"), run.series("share")) for run in runs]
    if not any(w[1] or s[1] for _, w, s in data):
        notes.append("weights_vs_shares.png not written: no run records task/<name>/weight or /share")
        return False
    from matplotlib.lines import Line2D

    fig, axes = _figure(len(runs))
    for ax, (run, (w_steps, weights), (s_steps, shares)) in zip(axes, data):
        if not weights and not shares:
            _empty_panel(ax, run.label, "no weights or batch shares recorded")
            notes.append(f"{run.label}: no task weights or batch shares (panel empty)")
            continue
        if not weights:
            notes.append(f"{run.label}: no task weights z_k recorded (shares only)")
        if not shares:
            notes.append(f"{run.label}: no realised batch shares recorded (weights only)")
        for name, z in weights.items():
            ax.plot(w_steps, z, lw=1.8, color=colors[name])
        for name, share in shares.items():
            ax.plot(s_steps, share, lw=1.2, ls="--", color=colors[name], alpha=0.85)
        handles = [Line2D([], [], color=colors[n], lw=2, label=n) for n in dict.fromkeys([*weights, *shares])]
        handles += [
            Line2D([], [], color="0.3", lw=1.8, label="weight z_k"),
            Line2D([], [], color="0.3", lw=1.2, ls="--", label="batch share"),
        ]
        ax.legend(handles=handles, fontsize=7, loc="best")
        _label_panel(ax, run.label, "fraction of batch", ylim=(0, None), legend=False)
    _save(fig, axes, "Task weights z vs realised batch shares", path)
    return True


def plot_zero_gradient_rates(runs: Sequence[Run], path: Path, colors: dict[str, Any], notes: list[str]) -> bool:
    data = [(run, run.series("zero_grad_rate")) for run in runs]
    if not any(rates for _, (_, rates) in data):
        notes.append("zero_gradient_rates.png not written: no run records task/<name>/zero_grad_rate")
        return False
    fig, axes = _figure(len(runs))
    for ax, (run, (steps, rates)) in zip(axes, data):
        if not rates:
            _empty_panel(ax, run.label, "no zero-gradient rates recorded")
            notes.append(f"{run.label}: no zero-gradient rates (panel empty)")
            continue
        for name, rate in rates.items():
            ax.plot(steps, rate, lw=1.5, color=colors[name], label=name)
        _label_panel(ax, run.label, "zero-gradient group rate")
    _save(fig, axes, "Zero-gradient rates per task", path)
    return True


# ----------------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------------


def comparison_rows(runs: Sequence[Run], thresholds: Sequence[float]) -> tuple[list[dict[str, Any]], list[str]]:
    """One dict per run with raw numbers (None where unknown), plus notes on what could not be computed."""
    notes: list[str] = []
    base = runs[0] if runs else None
    base_final = _final_accuracies(base) if base else None
    rows = []
    for run in runs:
        h = run.history
        steps = [r["step"] for r in run.train] + h.steps.tolist()
        row: dict[str, Any] = {
            "run": run.label,
            "run_dir": str(run.run_dir),
            "last_step": max(steps) if steps else None,
            "evals": int(h.steps.size),
            "final_eval_step": int(h.steps[-1]) if h.steps.size else None,
            "final_worst_accuracy": _finite_or_none(h.worst[-1]) if h.steps.size else None,
            "final_mean_accuracy": _finite_or_none(h.mean[-1]) if h.steps.size else None,
            "worst_task": None,
            "best_worst_accuracy": _finite_or_none(np.nanmax(h.worst)) if np.isfinite(h.worst).any() else None,
            "rel_change_vs_baseline": None,
        }
        final = _final_accuracies(run)
        if final:
            row["worst_task"] = min(final, key=lambda n: final[n])
        if len(runs) > 1 and run is not base and final:
            if not base_final:
                notes.append(f"no relative change: baseline {base.label} has no evaluation records")
            elif set(final) != set(base_final):
                notes.append(f"{run.label}: tasks differ from baseline {base.label}; no relative change")
            else:
                change = relative_change(final, base_final)
                row["rel_change_vs_baseline"] = _finite_or_none(change.mean)
                if change.skipped:
                    notes.append(
                        f"{run.label}: relative change leaves out {', '.join(change.skipped)} (baseline accuracy 0)"
                    )
        hits = steps_to_thresholds(h, thresholds)
        for t in thresholds:
            hit = hits[float(t)]
            row[f"steps_to_{t:g}"] = hit.step if hit else None
            row[f"hours_to_{t:g}"] = _finite_or_none(hit.hours) if hit else None
        rows.append(row)
    return rows, notes


def _final_accuracies(run: Run) -> dict[str, float]:
    h = run.history
    if not h.steps.size:
        return {}
    return {n: float(a[-1]) for n, a in h.accuracy.items() if np.isfinite(a[-1])}


def _finite_or_none(x: Any) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def _fmt(x: Any, spec: str = ".3f") -> str:
    return MISSING if x is None else format(x, spec)


def _fmt_duration(hours: float) -> str:
    if hours >= 1.0:
        return f"{hours:.2f} h"
    if hours * 60 >= 1.0:
        return f"{hours * 60:.1f} min"
    return f"{hours * 3600:.1f} s"


def _fmt_hit(step: int | None, hours: float | None, reached_possible: bool) -> str:
    if step is None:
        return "not reached" if reached_possible else MISSING
    return f"{step} ({_fmt_duration(hours)})" if hours is not None else str(step)


def markdown_table(rows: Sequence[dict[str, Any]], thresholds: Sequence[float], baseline: str | None) -> str:
    table = pd.DataFrame(
        {
            "run": [r["run"] for r in rows],
            "last step": [_fmt(r["last_step"], "d") for r in rows],
            "final worst-task": [_fmt(r["final_worst_accuracy"]) for r in rows],
            "final average": [_fmt(r["final_mean_accuracy"]) for r in rows],
            "worst task": [r["worst_task"] or MISSING for r in rows],
            "best worst-task": [_fmt(r["best_worst_accuracy"]) for r in rows],
        }
    )
    if baseline is not None:
        table[f"avg. rel. change vs {baseline}"] = [
            MISSING if r["rel_change_vs_baseline"] is None else f"{r['rel_change_vs_baseline']:+.1%}" for r in rows
        ]
    for t in thresholds:
        table[f"steps (time) to worst ≥ {t:g}"] = [
            _fmt_hit(r[f"steps_to_{t:g}"], r[f"hours_to_{t:g}"], r["evals"] > 0) for r in rows
        ]
    return _markdown(table)


def _markdown(table: pd.DataFrame) -> str:
    """A pipe table of already formatted cells (no number parsing, so '0.100' keeps its digits)."""
    table = table.map(lambda c: str(c).replace("|", "\\|"))
    return table.to_markdown(index=False, tablefmt="pipe", disable_numparse=True) + "\n"


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    pd.DataFrame(list(rows), columns=list(rows[0]) if rows else ["run"]).to_csv(path, index=False)


# ----------------------------------------------------------------------------------------------------
# Experiments: methods x seeds, paired by seed (the directory `mtgrpo experiment` writes)
# ----------------------------------------------------------------------------------------------------

EXPERIMENT_MANIFEST = "experiment.json"
EXPERIMENT_RUN_MARKER = "experiment_run.json"  # written by the runner once a run finished
UNWEIGHTED = ("uniform",)


@dataclass
class ExperimentRun:
    label: str  # method and grid point
    method: str
    seed: int
    run: Run
    weighted: bool  # task weights move (weighting.kind is not uniform)

    def final(self) -> tuple[int, dict[str, float], float, float] | None:
        """(step, per-task accuracy, worst, average) at the run's last evaluation, or None without one."""
        h = self.run.history
        if not h.steps.size:
            return None
        per = {n: float(a[-1]) for n, a in h.accuracy.items()}
        return int(h.steps[-1]), per, float(h.worst[-1]), float(h.mean[-1])


def mean_se(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean and standard error (sample std / sqrt(n)) of the finite values, and their count; the s.e. is
    NaN for fewer than two values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan, 0
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
    return float(v.mean()), se, int(v.size)


def is_experiment_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / EXPERIMENT_MANIFEST).is_file()


def load_experiment(exp_dir: str | os.PathLike) -> tuple[list[ExperimentRun], list[str]]:
    """The finished runs of an experiment directory (ordered by label, then seed) and notes on the rest."""
    import yaml

    exp_dir = Path(exp_dir)
    path = exp_dir / EXPERIMENT_MANIFEST
    if not path.is_file():
        raise ValueError(f"{exp_dir}: not an experiment directory (no {EXPERIMENT_MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        entries = manifest["runs"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: not a valid experiment manifest") from None
    runs: list[ExperimentRun] = []
    notes: list[str] = []
    for name, entry in entries.items():
        run_dir = exp_dir / entry["dir"]
        if not (run_dir / EXPERIMENT_RUN_MARKER).is_file():
            notes.append(f"{name}: not finished, left out")
            continue
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        kind = (cfg.get("weighting") or {}).get("kind", "uniform")
        label = entry["label"]
        runs.append(
            ExperimentRun(
                label,
                entry["method"],
                int(entry["seed"]),
                load_run(run_dir, f"{label}/seed_{entry['seed']}"),
                kind not in UNWEIGHTED,
            )
        )
    order = list(dict.fromkeys(e["label"] for e in entries.values()))
    runs.sort(key=lambda r: (order.index(r.label), r.seed))
    return runs, notes


def _by_label(runs: Sequence[ExperimentRun]) -> dict[str, list[ExperimentRun]]:
    out: dict[str, list[ExperimentRun]] = {}
    for r in runs:
        out.setdefault(r.label, []).append(r)
    return out


def _finals(runs: Sequence[ExperimentRun], notes: list[str]) -> dict[str, dict[int, tuple]]:
    """label -> seed -> final (step, per-task, worst, average), keeping only runs evaluated at the label's
    last evaluation step (a run that stopped earlier is not comparable at the final step)."""
    out: dict[str, dict[int, tuple]] = {}
    for label, group in _by_label(runs).items():
        finals = {r.seed: r.final() for r in group}
        for seed in [s for s, f in finals.items() if f is None]:
            notes.append(f"{label}/seed_{seed}: no evaluation records, left out")
            finals.pop(seed)
        last = max((f[0] for f in finals.values()), default=None)
        for seed in [s for s, f in finals.items() if f[0] != last]:
            notes.append(f"{label}/seed_{seed}: last evaluation at step {finals[seed][0]}, not {last}; left out")
            finals.pop(seed)
        out[label] = finals
    return out


def _stat(values: Sequence[float]) -> dict[str, float | None]:
    mean, se, _ = mean_se(values)
    return {"mean": _finite_or_none(mean), "se": _finite_or_none(se)}


def experiment_statistics(
    runs: Sequence[ExperimentRun], baseline: str, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
):
    """The report's numbers: (final table, paired table, weights table, summary dict, notes).

    final: one row per label: runs, step, per task / worst / average mean and s.e. over seeds, and for
      each threshold the mean step at which worst-task accuracy first reached it over the seeds that did
      (and how many did).
    paired: one row per label other than the baseline: over the seeds both ran, the mean and s.e. of the
      per-seed difference (label - baseline) of worst-task and average accuracy, per task, and of the
      average relative change mean_k (acc_k - base_k) / base_k.
    weights: one row per label and task: mean task weight and realised batch share over steps and seeds,
      the final weight, and the mean zero-gradient and filtered rates.
    """
    notes: list[str] = []
    groups = _by_label(runs)
    if baseline not in groups:
        raise ValueError(
            f"baseline {baseline!r} is not among the finished runs' methods ({', '.join(groups) or 'none'})"
        )
    finals = _finals(runs, notes)
    tasks: list[str] = []
    for label_finals in finals.values():
        for f in label_finals.values():
            tasks += [t for t in f[1] if t not in tasks]

    final_rows = []
    summary: dict[str, Any] = {"methods": {}, "paired": {}, "baseline": baseline}
    for label, group in groups.items():
        f = finals[label]
        row: dict[str, Any] = {"method": label, "runs": len(f), "step": next(iter(f.values()))[0] if f else None}
        for t in tasks:
            row[f"{t}_mean"], row[f"{t}_se"], _ = mean_se([v[1].get(t, math.nan) for v in f.values()])
        row["worst_mean"], row["worst_se"], _ = mean_se([v[2] for v in f.values()])
        row["average_mean"], row["average_se"], _ = mean_se([v[3] for v in f.values()])
        for thr in thresholds:
            hits = [steps_to_thresholds(r.run.history, [thr])[float(thr)] for r in group]
            reached = [h.step for h in hits if h is not None]
            row[f"steps_to_{thr:g}_mean"] = float(np.mean(reached)) if reached else None
            row[f"reached_{thr:g}"] = f"{len(reached)}/{len(group)}"
        final_rows.append(row)
        summary["methods"][label] = {
            "worst": _stat([v[2] for v in f.values()]),
            "average": _stat([v[3] for v in f.values()]),
            "runs": len(f),
        }

    paired_rows = []
    base = finals[baseline]
    for label in groups:
        if label == baseline:
            continue
        seeds = sorted(set(finals[label]) & set(base))
        if len(seeds) < len(finals[label]) or len(seeds) < len(base):
            notes.append(f"{label}-vs-{baseline}: paired over seeds {seeds} (those both finished)")
        m, b = finals[label], base
        dw = [m[s][2] - b[s][2] for s in seeds]
        da = [m[s][3] - b[s][3] for s in seeds]
        rel = []
        for s in seeds:
            if set(m[s][1]) != set(b[s][1]):
                notes.append(f"{label}/seed_{s}: tasks differ from {baseline}; no relative change")
                continue
            change = relative_change(m[s][1], b[s][1])
            if change.skipped:
                notes.append(
                    f"{label}/seed_{s}: relative change leaves out {', '.join(change.skipped)} ({baseline} accuracy 0)"
                )
            rel.append(change.mean)
        row = {"pair": f"{label}-vs-{baseline}", "seeds": len(seeds)}
        row["worst_diff_mean"], row["worst_diff_se"], _ = mean_se(dw)
        row["average_diff_mean"], row["average_diff_se"], _ = mean_se(da)
        row["rel_change_mean"], row["rel_change_se"], _ = mean_se(rel)
        for t in tasks:
            row[f"{t}_diff_mean"], row[f"{t}_diff_se"], _ = mean_se(
                [m[s][1].get(t, math.nan) - b[s][1].get(t, math.nan) for s in seeds]
            )
        paired_rows.append(row)
        summary["paired"][row["pair"]] = {"worst": _stat(dw), "average": _stat(da)}

    weight_rows = []
    for label, group in groups.items():
        for t in tasks:
            per_run = {suffix: [] for suffix in ("weight", "share", "zero_grad_rate", "filtered_rate")}
            final_w = []
            for r in group:
                for suffix in per_run:
                    values = r.run.series(suffix)[1].get(t)
                    if values is not None and np.isfinite(values).any():
                        per_run[suffix].append(float(np.nanmean(values)))
                        if suffix == "weight":
                            final_w.append(float(values[np.isfinite(values)][-1]))
            weight_rows.append(
                {
                    "method": label,
                    "task": t,
                    "weighted": group[0].weighted,
                    "mean_weight": mean_se(per_run["weight"])[0] if group[0].weighted else None,
                    "final_weight": mean_se(final_w)[0] if group[0].weighted else None,
                    "mean_share": mean_se(per_run["share"])[0],
                    "mean_zero_grad_rate": mean_se(per_run["zero_grad_rate"])[0],
                    "mean_filtered_rate": mean_se(per_run["filtered_rate"])[0],
                }
            )
    clean = lambda rows: [{k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    return clean(final_rows), clean(paired_rows), clean(weight_rows), summary, notes


def _pm(mean: float | None, se: float | None, spec: str = ".3f") -> str:
    if mean is None:
        return MISSING
    return format(mean, spec) + ("" if se is None else f" ± {format(se, spec)}")


def _curves(group: Sequence[ExperimentRun], key) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps, mean and s.e. over seeds of one evaluation series (`key(history) -> [E]`)."""
    steps = sorted({int(s) for r in group for s in r.run.history.steps})
    grid = np.full((len(group), len(steps)), np.nan)
    for i, r in enumerate(group):
        for s, v in zip(r.run.history.steps, key(r.run.history)):
            grid[i, steps.index(int(s))] = v
    mean = np.array([mean_se(grid[:, j])[0] for j in range(len(steps))])
    se = np.nan_to_num(np.array([mean_se(grid[:, j])[1] for j in range(len(steps))]))
    return np.array(steps), mean, se


def plot_experiment_curves(runs: Sequence[ExperimentRun], tasks: Sequence[str], path: Path) -> None:
    from matplotlib import colormaps

    groups = _by_label(runs)
    cmap = colormaps["tab10"]
    panels = [("worst-task accuracy", lambda h: h.worst), ("average accuracy", lambda h: h.mean)]
    panels += [(t, lambda h, t=t: h.accuracy.get(t, np.full(h.steps.shape, np.nan))) for t in tasks]
    fig, axes = _figure(len(panels))
    for ax, (title, key) in zip(axes, panels):
        for i, (label, group) in enumerate(groups.items()):
            steps, mean, se = _curves(group, key)
            color = cmap(i % cmap.N)
            ax.plot(steps, mean, marker="o", ms=3, lw=1.6, color=color, label=f"{label} (n={len(group)})")
            ax.fill_between(steps, mean - se, mean + se, color=color, alpha=0.2, lw=0)
        _label_panel(ax, title, "eval accuracy", ylim=None)
    _save(fig, axes, "Evaluation accuracy: mean over seeds, band ± 1 s.e.", path)


def _mean_series(group: Sequence[ExperimentRun], suffix: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    steps = sorted({int(s) for r in group for s in r.run.series(suffix)[0]})
    out: dict[str, list[np.ndarray]] = {}
    for r in group:
        st, values = r.run.series(suffix)
        for name, v in values.items():
            row = np.full(len(steps), np.nan)
            row[[steps.index(int(s)) for s in st]] = v
            out.setdefault(name, []).append(row)
    with np.errstate(all="ignore"):
        return np.array(steps), {n: np.nanmean(np.stack(rows), axis=0) for n, rows in out.items()}


def plot_experiment_series(runs: Sequence[ExperimentRun], path: Path, *, weighted_only: bool) -> bool:
    """Weights (solid) vs shares (dashed) per weighted method, or zero-gradient rates per method; means over seeds."""
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    groups = {k: g for k, g in _by_label(runs).items() if g[0].weighted or not weighted_only}
    if not groups:
        return False
    fig, axes = _figure(len(groups))
    cmap = colormaps["tab10"]
    for ax, (label, group) in zip(axes, groups.items()):
        if weighted_only:
            w_steps, weights = _mean_series(group, "weight")
            s_steps, shares = _mean_series(group, "share")
            names = list(dict.fromkeys([*weights, *shares]))
            for i, n in enumerate(names):
                if n in weights:
                    ax.plot(w_steps, weights[n], lw=1.8, color=cmap(i % cmap.N))
                if n in shares:
                    ax.plot(s_steps, shares[n], lw=1.2, ls="--", color=cmap(i % cmap.N))
            handles = [Line2D([], [], color=cmap(i % cmap.N), lw=2, label=n) for i, n in enumerate(names)]
            handles += [
                Line2D([], [], color="0.3", lw=1.8, label="weight z_k"),
                Line2D([], [], color="0.3", lw=1.2, ls="--", label="batch share"),
            ]
            ax.legend(handles=handles, fontsize=7, loc="best")
        else:
            steps, rates = _mean_series(group, "zero_grad_rate")
            for i, (n, v) in enumerate(rates.items()):
                ax.plot(steps, v, lw=1.5, color=cmap(i % cmap.N), label=n)
        _label_panel(
            ax,
            f"{label} (mean of {len(group)} seeds)",
            "fraction of batch" if weighted_only else "zero-gradient group rate",
            legend=not weighted_only,
        )
    _save(
        fig,
        axes,
        "Task weights z (solid) vs realised batch shares (dashed)" if weighted_only else "Zero-gradient rates per task",
        path,
    )
    return True


def write_experiment_report(
    exp_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    baseline: str = "dapo",
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> dict[str, Path]:
    """The comparison of an experiment directory: figures, tables (Markdown + CSV) in `out_dir` (default
    EXP_DIR/report) and EXP_DIR/summary.json. Returns {name: path} of what was written."""
    exp_dir = Path(exp_dir)
    runs, notes = load_experiment(exp_dir)
    if not runs:
        raise ValueError(f"{exp_dir}: no finished runs yet")
    final, paired, weights, summary, more = experiment_statistics(runs, baseline, thresholds)
    notes += more
    out = Path(out_dir) if out_dir is not None else exp_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    tasks = [
        c[: -len("_mean")]
        for c in final[0]
        if c.endswith("_mean") and not c.startswith(("worst_", "average_", "steps_to_"))
    ]
    written: dict[str, Path] = {}
    written["curves"] = out / "accuracy_over_steps.png"
    plot_experiment_curves(runs, tasks, written["curves"])
    if plot_experiment_series(runs, out / "weights_vs_shares.png", weighted_only=True):
        written["weights_vs_shares"] = out / "weights_vs_shares.png"
    if plot_experiment_series(runs, out / "zero_gradient_rates.png", weighted_only=False):
        written["zero_gradient_rates"] = out / "zero_gradient_rates.png"
    for name, rows in (("final", final), ("paired", paired), ("weights", weights)):
        written[f"{name}_csv"] = out / f"{name}.csv"
        pd.DataFrame(rows).to_csv(written[f"{name}_csv"], index=False)
    written["summary"] = exp_dir / "summary.json"
    written["summary"].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

    final_md = pd.DataFrame(
        {
            "method": [r["method"] for r in final],
            "runs": [r["runs"] for r in final],
            "step": [_fmt(r["step"], "d") for r in final],
        }
    )
    for t in tasks:
        final_md[t] = [_pm(r[f"{t}_mean"], r[f"{t}_se"]) for r in final]
    final_md["worst task"] = [_pm(r["worst_mean"], r["worst_se"]) for r in final]
    final_md["average"] = [_pm(r["average_mean"], r["average_se"]) for r in final]
    for thr in thresholds:
        final_md[f"steps to worst ≥ {thr:g}"] = [
            f"{_fmt(r[f'steps_to_{thr:g}_mean'], '.1f')} ({r[f'reached_{thr:g}']})" for r in final
        ]
    paired_md = pd.DataFrame(
        {
            "pair": [r["pair"] for r in paired],
            "seeds": [r["seeds"] for r in paired],
            "worst-task diff": [_pm(r["worst_diff_mean"], r["worst_diff_se"], "+.3f") for r in paired],
            "average diff": [_pm(r["average_diff_mean"], r["average_diff_se"], "+.3f") for r in paired],
            "avg. rel. change": [_pm(r["rel_change_mean"], r["rel_change_se"], "+.1%") for r in paired],
            **{f"{t} diff": [_pm(r[f"{t}_diff_mean"], r[f"{t}_diff_se"], "+.3f") for r in paired] for t in tasks},
        }
    )
    weights_md = pd.DataFrame(
        {
            "method": [r["method"] for r in weights],
            "task": [r["task"] for r in weights],
            "mean weight": [_fmt(r["mean_weight"]) for r in weights],
            "final weight": [_fmt(r["final_weight"]) for r in weights],
            "mean batch share": [_fmt(r["mean_share"]) for r in weights],
            "zero-gradient rate": [_fmt(r["mean_zero_grad_rate"]) for r in weights],
            "filtered rate": [_fmt(r["mean_filtered_rate"]) for r in weights],
        }
    )
    parts = [
        f"# Experiment report: {exp_dir}",
        "",
        "Accuracy at the final evaluation: mean ± standard error over seeds (sample std / √n).",
        "",
        "## Final accuracy",
        "",
        _markdown(final_md),
        f"## Paired difference against `{baseline}`",
        "",
        "Per seed, method minus baseline (same warm start, same evaluation prompts); mean ± s.e. over seeds. "
        "Average relative change: mean over tasks of (acc − base) / base.",
        "",
        _markdown(paired_md) if paired else "(no other method)\n",
        "## Task weights, realised batch shares, zero-gradient rates",
        "",
        "Means over all training steps and seeds; weights only for methods whose weights move.",
        "",
        _markdown(weights_md),
    ]
    figures = (
        ("curves", "Accuracy over steps"),
        ("weights_vs_shares", "Task weights vs realised batch shares"),
        ("zero_gradient_rates", "Zero-gradient rates"),
    )
    return _write_markdown(out, parts, written, figures, notes)


# ----------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------


def write_report(
    run_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    labels: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write the figures and the comparison table for `run_dirs` into `out_dir`.

    Returns {name: path} of the files written: "eval_accuracy", "weights_vs_shares",
    "zero_gradient_rates" (each only when some run has the data), "table_md", "table_csv", "report_md".
    The first run is the baseline of the relative-change column.
    """
    if not run_dirs:
        raise ValueError("write_report: no run directories given")
    for t in thresholds:
        if not 0.0 <= float(t) <= 1.0:
            raise ValueError(f"threshold {t} is not an accuracy in [0, 1]")
    dirs = [Path(d) for d in run_dirs]
    runs = [load_run(d, label) for d, label in zip(dirs, _unique_labels(dirs, labels))]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    notes: list[str] = [f"{run.label}: {note}" for run in runs for note in run.notes]
    colors = _task_colors(runs)
    written: dict[str, Path] = {}
    for name, plot in (
        ("eval_accuracy", plot_eval_accuracy),
        ("weights_vs_shares", plot_weights_vs_shares),
        ("zero_gradient_rates", plot_zero_gradient_rates),
    ):
        path = out / f"{name}.png"
        if plot(runs, path, colors, notes):
            written[name] = path

    rows, table_notes = comparison_rows(runs, thresholds)
    notes += table_notes
    baseline = runs[0].label if len(runs) > 1 else None
    table = markdown_table(rows, thresholds, baseline)
    written["table_md"] = out / "comparison.md"
    written["table_md"].write_text(table, encoding="utf-8")
    written["table_csv"] = out / "comparison.csv"
    write_csv(rows, written["table_csv"])

    parts = ["# MT-GRPO run report", "", "Runs: " + ", ".join(f"`{r.label}` ({r.run_dir})" for r in runs), ""]
    parts += ["## Comparison", "", table]
    if baseline is not None:
        parts += [
            f"Relative change: mean over tasks of (acc - base) / base at the final evaluation, base = `{baseline}`.",
            "",
        ]
    figures = (
        ("eval_accuracy", "Per-task evaluation accuracy"),
        ("weights_vs_shares", "Task weights vs realised batch shares"),
        ("zero_gradient_rates", "Zero-gradient rates"),
    )
    return _write_markdown(out, parts, written, figures, notes)


def _write_markdown(
    out: Path, parts: list[str], written: dict[str, Path], figures: Sequence[tuple[str, str]], notes: Sequence[str]
) -> dict[str, Path]:
    """`out/report.md`: the report's sections, then each written figure (name, title) and the notes (once each)."""
    for name, title in figures:
        if name in written:
            parts += [f"## {title}", "", f"![{title}]({written[name].name})", ""]
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in dict.fromkeys(notes)] + [""]
    written["report_md"] = out / "report.md"
    written["report_md"].write_text("\n".join(parts), encoding="utf-8")
    return written


def parse_thresholds(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"thresholds must be accuracies in [0, 1]: {text!r}")
    return values


def main(argv: Sequence[str] | None = None, prog: str = "mtgrpo report") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument(
        "run_dirs",
        nargs="+",
        metavar="DIR",
        help="run directories (the first is the baseline), or one experiment directory",
    )
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="where to write the PNGs and tables (an experiment's default: DIR/report)",
    )
    parser.add_argument(
        "--thresholds",
        type=parse_thresholds,
        default=DEFAULT_THRESHOLDS,
        help="worst-task accuracy thresholds, comma-separated (default: %(default)s)",
    )
    parser.add_argument("--labels", default=None, help="comma-separated run names (default: directory names)")
    parser.add_argument(
        "--baseline", default=None, help="an experiment's baseline method for the paired differences (default: dapo)"
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    experiment = len(args.run_dirs) == 1 and is_experiment_dir(args.run_dirs[0])
    try:
        if experiment:
            written = write_experiment_report(
                args.run_dirs[0], args.out, baseline=args.baseline or "dapo", thresholds=args.thresholds
            )
        else:
            if args.out is None:
                raise ValueError("--out is required for run directories")
            if args.baseline is not None:
                raise ValueError(
                    "--baseline is for an experiment directory; for run directories the first is the baseline"
                )
            written = write_report(args.run_dirs, args.out, thresholds=args.thresholds, labels=labels)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    for path in written.values():
        print(path)
    print()
    print((written["report_md"] if experiment else written["table_md"]).read_text(encoding="utf-8"), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
