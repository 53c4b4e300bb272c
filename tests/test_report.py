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


# ----------------------------------------------------------------------------------------------------
# An experiment directory (methods x seeds): the statistics against a hand computation
# ----------------------------------------------------------------------------------------------------

# final accuracies [easy, mid, hard] per method and seed, chosen by hand
FINAL = {
    "dapo": {0: [0.90, 0.50, 0.10], 1: [0.80, 0.40, 0.20], 2: [0.85, 0.45, 0.12]},
    "mt_grpo": {0: [0.88, 0.52, 0.16], 1: [0.82, 0.30, 0.28], 2: [0.80, 0.47, 0.20]},
}
EXP_TASKS = ("easy", "mid", "hard")


def _write_experiment(root, final=FINAL, unfinished=()):
    runs = {}
    for method, by_seed in final.items():
        for seed, acc in by_seed.items():
            rel = f"runs/{method}/seed_{seed}"
            run = root / rel
            runs[f"{method}/seed_{seed}"] = {"label": method, "method": method, "seed": seed, "grid": {}, "dir": rel}
            with MetricsWriter(run, tensorboard=False, console=False, is_primary=True) as w:
                w.write(0, {"split": "eval", **{f"eval/{t}/accuracy": 0.05 for t in EXP_TASKS}})
                for step in (1, 2):
                    rec = {f"task/{t}/zero_grad_rate": 0.1 * (i + 1) for i, t in enumerate(EXP_TASKS)}
                    rec.update({f"task/{t}/share": 1 / 3 for t in EXP_TASKS})
                    if method == "mt_grpo":
                        rec.update(
                            {
                                f"task/{t}/weight": [0.2, 0.3, 0.5][i] * step / 2 + (1 / 3) * (1 - step / 2)
                                for i, t in enumerate(EXP_TASKS)
                            }
                        )
                    w.write(step, rec)
                w.write(2, {"split": "eval", **{f"eval/{t}/accuracy": a for t, a in zip(EXP_TASKS, acc)}})
            kind = "mt_grpo" if method == "mt_grpo" else "uniform"
            (run / "config.yaml").write_text(f"weighting:\n  kind: {kind}\n")
            if f"{method}/seed_{seed}" not in unfinished:
                (run / "experiment_run.json").write_text("{}")
    (root / "experiment.json").write_text(json.dumps({"runs": runs}))


def test_experiment_statistics_match_a_hand_computation(tmp_path):
    _write_experiment(tmp_path)
    written = report.write_experiment_report(tmp_path, baseline="dapo", thresholds=(0.15, 0.9))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"methods", "paired", "baseline"} and summary["baseline"] == "dapo"

    def mean_se(xs):
        n = len(xs)
        m = sum(xs) / n
        return m, (sum((x - m) ** 2 for x in xs) / (n - 1)) ** 0.5 / n**0.5

    for method in FINAL:
        worst = [min(a) for a in FINAL[method].values()]
        avg = [sum(a) / 3 for a in FINAL[method].values()]
        got = summary["methods"][method]
        assert got["runs"] == 3
        assert (got["worst"]["mean"], got["worst"]["se"]) == pytest.approx(mean_se(worst))
        assert (got["average"]["mean"], got["average"]["se"]) == pytest.approx(mean_se(avg))
    # paired: per seed difference first, then its mean and s.e. (not the difference of the two means' s.e.)
    dw = [min(FINAL["mt_grpo"][s]) - min(FINAL["dapo"][s]) for s in range(3)]  # 0.06, 0.08, 0.08
    da = [sum(FINAL["mt_grpo"][s]) / 3 - sum(FINAL["dapo"][s]) / 3 for s in range(3)]
    pair = summary["paired"]["mt_grpo-vs-dapo"]
    assert (pair["worst"]["mean"], pair["worst"]["se"]) == pytest.approx(mean_se(dw))
    assert (pair["average"]["mean"], pair["average"]["se"]) == pytest.approx(mean_se(da))
    assert mean_se(dw)[1] < 0.01 < mean_se([min(a) for a in FINAL["mt_grpo"].values()])[1]  # pairing tightens it

    paired = {r["pair"]: r for r in _csv_rows(written["paired_csv"])}["mt_grpo-vs-dapo"]
    rel = [np.mean([(m - b) / b for m, b in zip(FINAL["mt_grpo"][s], FINAL["dapo"][s])]) for s in range(3)]
    assert (float(paired["rel_change_mean"]), float(paired["rel_change_se"])) == pytest.approx(mean_se(rel))
    assert float(paired["hard_diff_mean"]) == pytest.approx(np.mean([0.06, 0.08, 0.08]))

    final = {r["method"]: r for r in _csv_rows(written["final_csv"])}
    assert float(final["dapo"]["mid_mean"]) == pytest.approx(0.45)
    assert float(final["dapo"]["mid_se"]) == pytest.approx(mean_se([0.5, 0.4, 0.45])[1])
    # worst-task threshold 0.15: dapo reaches it in seed 1 only, mt_grpo in all three (at step 2)
    assert final["dapo"]["reached_0.15"] == "1/3" and final["mt_grpo"]["reached_0.15"] == "3/3"
    assert float(final["mt_grpo"]["steps_to_0.15_mean"]) == 2.0 and final["mt_grpo"]["steps_to_0.9_mean"] == ""

    weights = {(r["method"], r["task"]): r for r in _csv_rows(written["weights_csv"])}
    assert weights[("dapo", "hard")]["mean_weight"] == ""  # uniform: no weights to show
    assert float(weights[("mt_grpo", "hard")]["final_weight"]) == pytest.approx(0.5)
    assert float(weights[("mt_grpo", "hard")]["mean_weight"]) == pytest.approx((0.5 / 2 + 1 / 6 + 0.5) / 2)
    assert float(weights[("dapo", "mid")]["mean_zero_grad_rate"]) == pytest.approx(0.2)

    md = _squeeze(written["report_md"].read_text())
    w, se = mean_se(dw)
    assert f"| mt_grpo-vs-dapo | 3 | {w:+.3f} ± {se:+.3f} |" in md
    for name in ("curves", "weights_vs_shares", "zero_gradient_rates"):
        _check_png(written[name])


def test_experiment_report_leaves_out_unfinished_runs_and_pairs_what_remains(tmp_path, capsys):
    _write_experiment(tmp_path, unfinished=("dapo/seed_2",))
    assert report.main([str(tmp_path), "--baseline", "dapo"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["methods"]["dapo"]["runs"] == 2 and summary["methods"]["mt_grpo"]["runs"] == 3
    dw = [min(FINAL["mt_grpo"][s]) - min(FINAL["dapo"][s]) for s in range(2)]
    assert summary["paired"]["mt_grpo-vs-dapo"]["worst"]["mean"] == pytest.approx(np.mean(dw))
    notes = (tmp_path / "report" / "report.md").read_text().split("## Notes", 1)[1]
    assert "dapo/seed_2: not finished, left out" in notes and "paired over seeds [0, 1]" in notes
    capsys.readouterr()

    assert report.main([str(tmp_path), "--baseline", "grpo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "baseline 'grpo' is not among" in err
