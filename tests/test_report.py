"""The report from synthetic run directories: valid, non-blank PNGs; a table whose numbers are the ones
the runs recorded; graceful handling of runs that lack some metrics; the CLI."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from PIL import Image

from mtgrpo_jax import cli
from mtgrpo_jax.train import report
from mtgrpo_jax.train.metrics import MetricsWriter

TASKS = ("countdown-l1", "zebra_3x3", "arc")


def _write_run(run_dir, *, seed, steps=12, eval_every=3, with_weights=True, with_eval=True, seconds_per_step=600.0):
    """A run through the real writer; returns the per-step eval accuracies it recorded."""
    rng = np.random.default_rng(seed)
    acc = np.array([0.05, 0.3, 0.6])
    evals = {}
    with MetricsWriter(run_dir, tensorboard=False, console=False, is_primary=True) as w:
        for step in range(1, steps + 1):
            rec = {"elapsed_s": seconds_per_step * step}
            z = np.exp(-3 * acc) / np.exp(-3 * acc).sum()
            for i, t in enumerate(TASKS):
                rec[f"task/{t}/reward"] = acc[i] + 0.05
                rec[f"task/{t}/accuracy"] = acc[i]
                rec[f"task/{t}/zero_grad_rate"] = float(abs(acc[i] - 0.5) + 0.1)
                if with_weights:
                    rec[f"task/{t}/weight"] = z[i]
                    rec[f"task/{t}/share"] = z[i] + rng.normal() * 0.01
            w.write(step, rec)
            acc = np.minimum(acc + rng.uniform(0.0, 0.06, 3), 1.0)
            if with_eval and step % eval_every == 0:
                e = {"split": "eval", "elapsed_s": seconds_per_step * step + 30}
                e.update({f"eval/{t}/accuracy": float(a) for t, a in zip(TASKS, acc)})
                e["eval/worst_accuracy"] = float(acc.min())
                e["eval/mean_accuracy"] = float(acc.mean())
                w.write(step, e)
                evals[step] = dict(zip(TASKS, acc.tolist()))
    return evals


def _squeeze(markdown):
    """A pandas/tabulate table pads its cells to the column width; compare cell contents, not padding."""
    return re.sub(r" {2,}", " ", markdown)


def _csv_rows(path):
    return list(csv.DictReader(path.read_text(encoding="utf-8").splitlines()))


def _check_png(path):
    assert path.is_file()
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 200
        pixels = np.asarray(im.convert("L"), dtype=float)
    assert pixels.std() > 5  # something was drawn


def test_report_plots_and_table_match_the_runs(tmp_path):
    a = _write_run(tmp_path / "mt_grpo", seed=0)
    b = _write_run(tmp_path / "grpo", seed=1, seconds_per_step=7200.0)
    out = tmp_path / "report"
    written = report.write_report([tmp_path / "mt_grpo", tmp_path / "grpo"], out, thresholds=(0.1, 0.2, 0.99))
    figures = {"eval_accuracy", "weights_vs_shares", "zero_gradient_rates"}
    assert set(written) == figures | {"table_md", "table_csv", "report_md"}
    for key in ("eval_accuracy", "weights_vs_shares", "zero_gradient_rates"):
        _check_png(written[key])

    rows = {r["run"]: r for r in _csv_rows(written["table_csv"])}
    for label, evals, sps in (("mt_grpo", a, 600.0), ("grpo", b, 7200.0)):
        row = rows[label]
        final = evals[max(evals)]
        assert int(row["last_step"]) == 12 and int(row["evals"]) == len(evals) == 4
        assert float(row["final_worst_accuracy"]) == pytest.approx(min(final.values()))
        assert float(row["final_mean_accuracy"]) == pytest.approx(np.mean(list(final.values())))
        assert row["worst_task"] == min(final, key=final.get)
        for t in (0.1, 0.2, 0.99):
            hit = next((s for s in sorted(evals) if min(evals[s].values()) >= t), None)
            if hit is None:
                assert row[f"steps_to_{t:g}"] == "" and row[f"hours_to_{t:g}"] == ""
            else:
                assert int(row[f"steps_to_{t:g}"]) == hit
                assert float(row[f"hours_to_{t:g}"]) == pytest.approx((sps * hit + 30) / 3600)
    fa, fb = a[max(a)], b[max(b)]
    expected_rel = np.mean([(fb[t] - fa[t]) / fa[t] for t in TASKS])
    assert rows["mt_grpo"]["rel_change_vs_baseline"] == ""
    assert float(rows["grpo"]["rel_change_vs_baseline"]) == pytest.approx(expected_rel)

    md = _squeeze(written["table_md"].read_text())
    assert "| run | last step | final worst-task |" in md and "avg. rel. change vs mt_grpo" in md
    assert f"| mt_grpo | 12 | {min(fa.values()):.3f} |" in md
    assert "not reached" in md  # 0.99 is out of reach for both
    hit = next(s for s in sorted(b) if min(b[s].values()) >= 0.1)
    assert f"{hit} ({(7200.0 * hit + 30) / 3600:.2f} h)" in md
    rep = written["report_md"].read_text()
    assert "![Per-task evaluation accuracy](eval_accuracy.png)" in rep and "## Notes" not in rep


def test_missing_metrics_are_noted_not_fatal(tmp_path):
    _write_run(tmp_path / "no_eval", seed=0, with_eval=False)
    _write_run(tmp_path / "uniform", seed=1, with_weights=False)
    written = report.write_report([tmp_path / "no_eval", tmp_path / "uniform"], tmp_path / "out")
    for key in ("eval_accuracy", "weights_vs_shares", "zero_gradient_rates"):
        _check_png(written[key])  # each figure has at least one run with data; the other panel says why not
    notes = written["report_md"].read_text().split("## Notes", 1)[1]
    assert "no_eval: no evaluation records" in notes
    assert "uniform: no task weights or batch shares" in notes
    rows = {r["run"]: r for r in _csv_rows(written["table_csv"])}
    assert rows["no_eval"]["final_worst_accuracy"] == "" and rows["uniform"]["final_worst_accuracy"] != ""
    assert "| no_eval | 12 | — | — | — | — | — |" in _squeeze(written["table_md"].read_text())

    # No run has any weights or evaluations: those figures are skipped and noted.
    written = report.write_report([tmp_path / "no_eval"], tmp_path / "out2")
    assert "eval_accuracy" not in written and "zero_gradient_rates" in written
    assert "eval_accuracy.png not written" in written["report_md"].read_text()

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    written = report.write_report([empty], tmp_path / "out3")
    assert set(written) == {"table_md", "table_csv", "report_md"}
    assert "empty: metrics.jsonl is empty" in written["report_md"].read_text()


def test_labels_are_unique_and_free_form_task_names_survive(tmp_path):
    for parent in ("x", "y"):
        run = tmp_path / parent / "run"
        run.mkdir(parents=True)
        recs = [
            {"step": 1, "time": 0.0, "elapsed_s": 3600.0, "task/math/gsm8k/weight": 1.0},
            {"step": 1, "time": 0.0, "elapsed_s": 3600.0, "split": "eval", "eval/math/gsm8k/accuracy": 0.5},
        ]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    runs = [tmp_path / "x" / "run", tmp_path / "y" / "run"]
    written = report.write_report(runs, tmp_path / "out", thresholds=(0.5,))
    rows = _csv_rows(written["table_csv"])
    assert [r["run"] for r in rows] == ["run", "run#2"]
    assert rows[0]["worst_task"] == "math/gsm8k"
    assert rows[0]["steps_to_0.5"] == "1" and rows[0]["hours_to_0.5"] == "1.0"


def test_cli(tmp_path, capsys):
    _write_run(tmp_path / "run_a", seed=0, steps=6)
    assert cli.main(["report", str(tmp_path / "run_a"), "--out", str(tmp_path / "o"), "--thresholds", "0.1,0.4"]) == 0
    out = capsys.readouterr().out
    assert "comparison.csv" in out and "steps (time) to worst ≥ 0.4" in out
    assert (tmp_path / "o" / "eval_accuracy.png").is_file()

    assert report.main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")], prog="mtgrpo report") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "run directory not found" in err and "nope" in err

    with pytest.raises(SystemExit) as exc:
        report.main([str(tmp_path / "run_a"), "--out", "o", "--thresholds", "0.2,1.5"])
    assert exc.value.code == 2
    assert "thresholds must be accuracies in [0, 1]" in capsys.readouterr().err
