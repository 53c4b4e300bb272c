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
import csv
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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


def _integer_steps(axes) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


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
        ax.set_title(run.label)
        ax.set_xlabel("step")
        ax.set_ylabel("eval accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    _integer_steps(axes)
    fig.suptitle("Per-task evaluation accuracy")
    fig.savefig(path)
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
        ax.set_title(run.label)
        ax.set_xlabel("step")
        ax.set_ylabel("fraction of batch")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    _integer_steps(axes)
    fig.suptitle("Task weights z vs realised batch shares")
    fig.savefig(path)
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
        ax.set_title(run.label)
        ax.set_xlabel("step")
        ax.set_ylabel("zero-gradient group rate")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    _integer_steps(axes)
    fig.suptitle("Zero-gradient rates per task")
    fig.savefig(path)
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
                        f"{run.label}: relative change leaves out {', '.join(change.skipped)}"
                        f" (baseline accuracy 0)"
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
    header = ["run", "last step", "final worst-task", "final average", "worst task", "best worst-task"]
    if baseline is not None:
        header.append(f"avg. rel. change vs {baseline}")
    header += [f"steps (time) to worst ≥ {t:g}" for t in thresholds]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = [
            r["run"],
            _fmt(r["last_step"], "d"),
            _fmt(r["final_worst_accuracy"]),
            _fmt(r["final_mean_accuracy"]),
            r["worst_task"] or MISSING,
            _fmt(r["best_worst_accuracy"]),
        ]
        if baseline is not None:
            rel = r["rel_change_vs_baseline"]
            cells.append(MISSING if rel is None else f"{rel:+.1%}")
        cells += [_fmt_hit(r[f"steps_to_{t:g}"], r[f"hours_to_{t:g}"], r["evals"] > 0) for t in thresholds]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    fields = list(rows[0]) if rows else ["run"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in r.items()})


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
            "Relative change: mean over tasks of (acc - base) / base at the final evaluation,"
            f" base = `{baseline}`.",
            "",
        ]
    for name, title in (
        ("eval_accuracy", "Per-task evaluation accuracy"),
        ("weights_vs_shares", "Task weights vs realised batch shares"),
        ("zero_gradient_rates", "Zero-gradient rates"),
    ):
        if name in written:
            parts += [f"## {title}", "", f"![{title}]({written[name].name})", ""]
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in dict.fromkeys(notes)] + [""]
    written["report_md"] = out / "report.md"
    written["report_md"].write_text("\n".join(parts), encoding="utf-8")
    return written


def _parse_thresholds(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"thresholds must be accuracies in [0, 1]: {text!r}")
    return values


def main(argv: Sequence[str] | None = None, prog: str = "mtgrpo report") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (the first is the baseline)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write the PNGs and tables")
    parser.add_argument(
        "--thresholds",
        type=_parse_thresholds,
        default=DEFAULT_THRESHOLDS,
        help="worst-task accuracy thresholds, comma-separated (default: %(default)s)",
    )
    parser.add_argument("--labels", default=None, help="comma-separated run names (default: directory names)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    try:
        written = write_report(args.run_dirs, args.out, thresholds=args.thresholds, labels=labels)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    for path in written.values():
        print(path)
    print()
    print(written["table_md"].read_text(encoding="utf-8"), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
