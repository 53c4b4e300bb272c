"""The experiment runner: scheduling, skip and resume, the paired warm start, bad input.

The runs are a stand-in `mtgrpo` (tests/_fake_mtgrpo.py) that resolves configs exactly as `mtgrpo train`
does and writes what it writes, without training; one real tiny experiment is marked slow."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from mtgrpo_jax import cli
from mtgrpo_jax.experiment import Experiment, ExperimentError, directory_sha256, main, parse_methods, parse_seeds

ROOT = Path(__file__).resolve().parents[1]
FAKE = [sys.executable, str(Path(__file__).with_name("_fake_mtgrpo.py"))]

CONFIG = {
    "model": {"init": "random", "dtype": "float32"},
    "tasks": [
        {
            "name": "easy",
            "family": "arithmetic",
            "train": {"level": 1, "n": 8, "seed": 1},
            "eval": {"level": 1, "n": 4, "seed": 9},
        },
        {
            "name": "mid",
            "family": "arithmetic",
            "train": {"level": 2, "n": 8, "seed": 2},
            "eval": {"level": 2, "n": 4, "seed": 8},
        },
        {
            "name": "hard",
            "family": "arithmetic",
            "train": {"level": 4, "n": 8, "seed": 3},
            "eval": {"level": 4, "n": 4, "seed": 7},
        },
    ],
    "sampler": {"batch_size": 4, "group_size": 4},
    "optim": {"mini_batches": 2},
    "sft": {"steps": 5, "demonstration_style": "answer"},
    "train": {"steps": 4, "eval_every": 2},
}


@pytest.fixture
def setup(tmp_path, monkeypatch):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    log = tmp_path / "invocations.jsonl"
    monkeypatch.setenv("FAKE_MTGRPO_LOG", str(log))
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return cfg, log, tmp_path / "exp"


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def experiment(cfg, out, methods=("grpo", "dapo", "mt_grpo"), seeds=(0, 1), **kw) -> Experiment:
    return Experiment(cfg, list(methods), list(seeds), out, command=FAKE, log=lambda *_: None, **kw)


def test_runs_every_method_and_seed_from_one_warm_start_per_seed(setup):
    cfg, log, out = setup
    result = experiment(cfg, out, parallel=2).run()
    names = [f"{m}/seed_{s}" for s in (0, 1) for m in ("grpo", "dapo", "mt_grpo")]
    assert sorted(result["done"]) == sorted(["warmstart/seed_0", "warmstart/seed_1", *names])
    assert result["failed"] == result["stopped"] == result["skipped"] == []
    inv = calls(log)
    assert sorted(c["seed"] for c in inv if c["cmd"] == "sft") == [0, 1]  # one warm start per seed, not per run
    trains = [c for c in inv if c["cmd"] == "train"]
    assert len(trains) == 6 and all(c["start"] == 0 and c["sft_steps"] == 0 for c in trains)
    for seed in (0, 1):
        sha = directory_sha256(out / "warmstart" / f"seed_{seed}" / "hf_sft")
        assert json.loads((out / "warmstart" / f"seed_{seed}" / "warm_start.json").read_text())["sha256"] == sha
        for m in ("grpo", "dapo", "mt_grpo"):
            run = out / "runs" / m / f"seed_{seed}"
            marker = json.loads((run / "experiment_run.json").read_text())
            assert marker["warm_start"]["sha256"] == sha and marker["seed"] == seed and marker["method"] == m
            # what the run itself loaded: the same bytes, and the run's config points at them
            assert next(c for c in trains if c["dir"] == str(run))["warm_sha"] == sha
            saved = yaml.safe_load((run / "config.yaml").read_text())
            assert saved["model"]["path"] == str(out / "warmstart" / f"seed_{seed}" / "hf_sft")
            assert saved["seed"] == seed and saved["method"] == m
            # same held-out prompts for every method of the experiment
            assert [{k: t["eval"][k] for k in ("level", "n", "seed")} for t in saved["tasks"]] == [
                t["eval"] for t in CONFIG["tasks"]
            ]
    assert directory_sha256(out / "warmstart/seed_0/hf_sft") != directory_sha256(out / "warmstart/seed_1/hf_sft")

    # A rerun finds everything finished and starts nothing.
    n = len(calls(log))
    again = experiment(cfg, out).run()
    assert again["done"] == [] and len(again["skipped"]) == 8 and len(calls(log)) == n


def test_killed_experiment_rerun_finishes_only_the_missing_runs(setup, monkeypatch):
    cfg, log, out = setup
    monkeypatch.setenv("FAKE_MTGRPO_KILL", "runs/dapo/seed_0:2")
    first = experiment(cfg, out, parallel=1).run()
    assert first["done"] == ["warmstart/seed_0", "grpo/seed_0"]  # seed-major order, one job at a time
    assert first["stopped"][0] == "dapo/seed_0" and "mt_grpo/seed_1" in first["stopped"]
    assert not (out / "runs/dapo/seed_0/experiment_run.json").exists()
    n_before = len(calls(log))

    monkeypatch.delenv("FAKE_MTGRPO_KILL")
    second = experiment(cfg, out, parallel=1).run()
    assert second["skipped"] == ["warmstart/seed_0", "grpo/seed_0"]
    assert second["stopped"] == second["failed"] == []
    rerun = calls(log)[n_before:]
    assert all(not (c["cmd"] == "train" and c["method"] == "grpo" and c["seed"] == 0) for c in rerun)
    assert [c["seed"] for c in rerun if c["cmd"] == "sft"] == [1]
    resumed = next(c for c in rerun if c["cmd"] == "train" and c["method"] == "dapo" and c["seed"] == 0)
    assert resumed["start"] == 2  # from its checkpoint, not from scratch
    # the resumed run's history is whole: one eval record per evaluation step
    from mtgrpo_jax.train.metrics import read_metrics

    evals = [r["step"] for r in read_metrics(out / "runs/dapo/seed_0", split="eval")]
    assert evals == [0, 2, 4]


def test_grid_points_are_runs_of_their_own(setup):
    cfg, log, out = setup
    result = experiment(cfg, out, methods=("mt_grpo",), seeds=(0,), grid=["weighting.lam=0.1,0.5"]).run()
    assert sorted(result["done"]) == [
        "mt_grpo+weighting.lam=0.1/seed_0",
        "mt_grpo+weighting.lam=0.5/seed_0",
        "warmstart/seed_0",
    ]
    lams = {
        json.loads((d / "experiment_run.json").read_text())["grid"]["weighting.lam"]: yaml.safe_load(
            (d / "config.yaml").read_text()
        )["weighting"]["lam"]
        for d in (out / "runs").glob("*/seed_0")
    }
    assert lams == {"0.1": 0.1, "0.5": 0.5}


def test_run_directory_of_another_config_is_refused(setup, tmp_path):
    cfg, log, out = setup
    experiment(cfg, out, methods=("grpo",), seeds=(0,)).run()
    # the same experiment directory with another config: refused before anything runs
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**CONFIG, "train": {"steps": 6, "eval_every": 2}}))
    with pytest.raises(ExperimentError, match=r"another config \(train\.steps: 4 there, 6 now\)") as e:
        experiment(other, out, methods=("grpo",), seeds=(0,)).run()
    assert "\n" not in str(e.value)
    # an override that changes one run's config, caught at that run's directory
    n = len(calls(log))
    with pytest.raises(ExperimentError, match="another config"):
        experiment(cfg, out, methods=("grpo",), seeds=(0,), overrides=["optim.learning_rate=0.5"]).run()
    assert len(calls(log)) == n


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "grpo,bogus", "--seeds", "0"], "--methods: unknown method 'bogus'"),
        (["--methods", "grpo", "--seeds", ""], "--seeds: no seeds given"),
        (["--methods", "grpo", "--seeds", "0,x"], "--seeds: not a comma-separated list of integers"),
        (
            ["--methods", "grpo", "--seeds", "0", "--grid", "weighting.lamb=0.1,0.2"],
            "--grid: config has no key 'weighting.lamb'",
        ),
        (["--methods", "grpo", "--seeds", "0", "--grid", "sft.steps=1,2"], "would break the shared warm start"),
        (["--methods", "grpo", "--seeds", "0", "seed=3"], "the experiment sets seed itself"),
        (["--methods", "grpo", "--seeds", "0", "optim.lr=3"], "unknown key 'optim.lr'"),
        (["--methods", "grpo", "--seeds", "0", "--thresholds", "0.1,2"], "thresholds must be accuracies in [0, 1]"),
    ],
)
def test_bad_input_is_one_line(setup, capsys, argv, message):
    cfg, log, out = setup
    assert main(["--config", str(cfg), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not calls(log)


def test_parsers():
    assert parse_seeds(" 0, 1,2 ") == [0, 1, 2]
    with pytest.raises(ExperimentError, match="given twice"):
        parse_seeds("1,1")
    assert parse_methods("grpo, dapo") == ["grpo", "dapo"]
    with pytest.raises(ExperimentError, match="no methods"):
        parse_methods(" , ")


def test_cli_dispatch_reaches_the_runner(setup, capsys):
    cfg, log, out = setup
    assert cli.main(["experiment", "--config", str(cfg), "--methods", "nope", "--seeds", "0", "--out", str(out)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_experiment_writes_the_report(setup, monkeypatch):
    """End to end through main() with the stand-in runs: report files and summary.json appear."""
    cfg, log, out = setup
    import mtgrpo_jax.experiment as exp_mod

    monkeypatch.setattr(exp_mod, "DEFAULT_COMMAND", FAKE)
    rc = main(["--config", str(cfg), "--methods", "grpo,dapo,mt_grpo", "--seeds", "0,1", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["baseline"] == "dapo" and set(summary["paired"]) == {"grpo-vs-dapo", "mt_grpo-vs-dapo"}
    assert summary["methods"]["mt_grpo"]["runs"] == 2
    for name in ("accuracy_over_steps.png", "weights_vs_shares.png", "final.csv", "paired.csv", "report.md"):
        assert (out / "report" / name).is_file()


@pytest.mark.slow
def test_real_tiny_experiment(tmp_path, monkeypatch):
    """Two methods, one seed, the real `mtgrpo train` on a tiny model: the warm start is shared and the
    report says how the methods compare."""
    cfg = tmp_path / "tiny.yaml"
    tiny = {
        **CONFIG,
        "model": {
            "init": "random",
            "dtype": "float32",
            "overrides": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
            },
        },
        "data_dir": str(tmp_path / "data"),
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "rollout": {
            "max_new_tokens": 6,
            "prompt_style": "compact",
            "prompt_buckets": [64],
            "batch_buckets": [4, 8, 16],
        },
        "sampler": {"batch_size": 4, "group_size": 2, "resample_budget": 1},
        "sft": {"steps": 3, "batch_size": 8, "examples_per_task": 8, "demonstration_style": "answer"},
        "train": {"steps": 1, "eval_every": 1, "checkpoint_every": 1},
        "eval": {"n": 2, "max_examples": 2},
        "logging": {"console": False, "tensorboard": False},
    }
    cfg.write_text(yaml.safe_dump(tiny))
    out = tmp_path / "exp"
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device per run, as a user's machine has
    rc = main(
        ["--config", str(cfg), "--methods", "grpo,mt_grpo", "--seeds", "0", "--out", str(out), "--baseline", "grpo"]
    )
    assert rc == 0, "\n".join(p.read_text()[-2000:] for p in (out / "logs").glob("*.log"))
    shas = {
        json.loads((d / "experiment_run.json").read_text())["warm_start"]["sha256"]
        for d in (out / "runs").glob("*/seed_0")
    }
    assert shas == {directory_sha256(out / "warmstart/seed_0/hf_sft")}
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"grpo", "mt_grpo"} and "mt_grpo-vs-grpo" in summary["paired"]
    # the configs the real runs saved are the ones the runner resolves: a rerun skips them all
    again = Experiment(cfg, ["grpo", "mt_grpo"], [0], out, log=lambda *_: None).run()
    assert again == {
        "done": [],
        "skipped": ["warmstart/seed_0", "grpo/seed_0", "mt_grpo/seed_0"],
        "failed": [],
        "stopped": [],
    }
