"""The trainer end to end on a tiny model over the 8 fake CPU devices: every method preset, exact resume
after SIGKILL, a NaN step skipped, and bad configs refused with one line naming the culprit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from mtgrpo_jax.config import load_config

ROOT = Path(__file__).resolve().parents[2]
METHODS = sorted(p.stem for p in (ROOT / "configs" / "methods").glob("*.yaml"))
FAST_METHODS = {"grpo", "mt_grpo", "dapo"}
VOLATILE = ("time", "elapsed_s", "time/", "rollout/tokens_per_s", "memory/")


def tiny_overrides(run_dir: Path, data_dir: Path, **extra) -> list[str]:
    base = {
        "output_dir": str(run_dir),
        "data_dir": str(data_dir),
        "model.init": "random",
        "model.dtype": "float32",
        "model.overrides": "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
        "num_key_value_heads: 1}",
        "tasks": "[{name: arc, family: arc_1d, train: {level: 1, n: 12, seed: 1}, eval: {level: 1, n: 4, seed: 9}},"
        " {name: countdown, family: countdown, train: {level: 1, n: 12, seed: 2}, eval: {level: 1, n: 4, seed: 8}}]",
        "rollout.max_new_tokens": 8,
        "rollout.prompt_style": "compact",
        "rollout.prompt_buckets": "[256, 512]",
        "rollout.batch_buckets": "[8, 16]",
        "sampler.batch_size": 4,
        "sampler.group_size": 4,
        "sampler.resample_budget": 2,
        "optim.mini_batches": 2,
        "optim.learning_rate": 1e-3,
        "train.steps": 2,
        "train.eval_every": 2,
        "train.checkpoint_every": 1,
        "eval.n": 2,
        "eval.max_examples": 2,
        "logging.console": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def stable(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(VOLATILE)}


def run_inprocess(overrides: list[str], method: str | None = None):
    from mtgrpo_jax.train.trainer import Trainer

    presets = [ROOT / "configs" / "methods" / f"{method}.yaml"] if method else []
    cfg = load_config(None, overrides, presets)
    trainer = Trainer(cfg)
    outcome = trainer.run()
    return trainer, outcome


@pytest.mark.parametrize(
    "method", [pytest.param(m, marks=() if m in FAST_METHODS else pytest.mark.slow) for m in METHODS]
)
def test_each_method_runs_end_to_end(method, tmp_path, data_dir):
    trainer, outcome = run_inprocess(tiny_overrides(tmp_path / "run", data_dir), method)
    assert outcome == {"status": "done", "step": 2}
    steps = [r for r in trainer.history if "split" not in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        shares = [r[f"task/{n}/share"] for n in trainer.names]
        weights = [r[f"task/{n}/weight"] for n in trainer.names]
        assert abs(sum(weights) - 1) < 1e-5 and all(0 <= s <= 1 for s in shares)
        assert np.isfinite(r["train/loss"]) and r["train/skipped"] == 0
    evals = [r for r in trainer.history if r.get("split") == "eval"]
    assert [e["step"] for e in evals] == [0, 2]
    # The parameters are sharded over the mesh and have moved away from their initial values.
    leaf = jax.tree.leaves(trainer.params)[0]
    assert len(leaf.sharding.device_set) == 8
    assert (tmp_path / "run" / "hf_final" / "config.json").is_file()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(trainer.history)


def test_non_finite_step_is_skipped_and_parameters_untouched(tmp_path, data_dir):
    from mtgrpo_jax.train.trainer import Trainer

    cfg = load_config(
        None,
        tiny_overrides(tmp_path / "run", data_dir, **{"train.steps": 1, "train.eval_every": 0}),
        [ROOT / "configs" / "methods" / "grpo.yaml"],
    )
    trainer = Trainer(cfg)
    before = jax.tree.map(np.asarray, trainer.params)
    original = trainer._generate_groups

    def poisoned(task_ids, step, call, stats):
        groups = original(task_ids, step, call, stats)
        for _, g in groups:
            g.advantages = np.full_like(g.advantages, np.nan)
        return groups

    trainer._generate_groups = poisoned
    record = trainer.train_step()
    assert record["train/skipped"] == cfg.optim.mini_batches
    after = jax.tree.map(np.asarray, trainer.params)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "mtgrpo_jax.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def _final_params(run_dir: Path) -> dict:
    from safetensors.numpy import load_file

    files = sorted((run_dir / "hf_final").glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


@pytest.mark.slow
def test_killed_and_resumed_run_matches_an_uninterrupted_one(tmp_path, data_dir):
    steps = {"train.steps": 5, "train.eval_every": 2, "train.checkpoint_every": 1}
    straight = _cli(["train", "--method", "mt_grpo", *tiny_overrides(tmp_path / "a", data_dir, **steps)])
    out, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, out

    args = ["train", "--method", "mt_grpo", *tiny_overrides(tmp_path / "b", data_dir, **steps)]
    victim = _cli(args)
    ckpt = tmp_path / "b" / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and victim.poll() is None:
        done = [p for p in ckpt.glob("*") if p.name.isdigit() and int(p.name) >= 2] if ckpt.exists() else []
        if done:
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = _cli(args)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resumed from step" in out

    hist_a = [stable(json.loads(x)) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    hist_b = [stable(json.loads(x)) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert hist_a == hist_b
    pa, pb = _final_params(tmp_path / "a"), _final_params(tmp_path / "b")
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"optim.lrr": 1}, "unknown key 'optim.lrr'"),
        ({"sampler.batch_size": "x"}, "sampler.batch_size"),
        ({"weighting.lam": -1}, "weighting.lam"),
        ({"sampler.batch_size": 3, "sampler.group_size": 2, "optim.mini_batches": 1}, "sampler.batch_size"),
        ({"mesh.data": 3}, "mesh"),
        ({"tasks.0.train": "{path: /nonexistent/train.parquet}"}, "/nonexistent/train.parquet"),
        ({"model.init": "pretrained", "model.path": "__MODEL_DIR__"}, "__MODEL_DIR__"),
        ({"tasks.0.family": "no_such_task"}, "tasks.0.family"),
    ],
)
def test_bad_config_gives_one_line_naming_the_culprit(extra, needle, tmp_path, data_dir):
    empty_model = tmp_path / "model_without_weights"
    empty_model.mkdir()
    (empty_model / "config.json").write_text(
        (ROOT / "mtgrpo_jax" / "assets" / "tiny_model" / "config.json").read_text()
    )
    extra = {k: str(v).replace("__MODEL_DIR__", str(empty_model)) for k, v in extra.items()}
    needle = needle.replace("__MODEL_DIR__", str(empty_model))
    proc = _cli(["train", *tiny_overrides(tmp_path / "run", data_dir, **extra)])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out
    lines = [line for line in out.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], out


def test_lenient_filter_switch_keeps_all_partial_credit_groups_like_the_release():
    from mtgrpo_jax.config import SamplerCfg
    from mtgrpo_jax.train.trainer import _filter_groups

    rewards = np.array([[0, 0, 0], [1, 1, 1], [0.1, 0.1, 0.1], [1, 0, 0.1], [0.1, 0, 0]], np.float32)
    correct = rewards == 1
    paper = _filter_groups(SamplerCfg(filter="lenient"), rewards, correct)
    released = _filter_groups(SamplerCfg(filter="lenient", lenient_drops_all_equal=False), rewards, correct)
    np.testing.assert_array_equal(paper, [False, False, False, True, True])
    # the release with pure_acc_filter=False drops only all-0 and all-1 groups (ray_trainer.py, the uid loop)
    np.testing.assert_array_equal(released, [False, False, True, True, True])
    np.testing.assert_array_equal(
        _filter_groups(SamplerCfg(filter="strict"), rewards, correct), [False, False, False, True, False]
    )
    assert _filter_groups(SamplerCfg(filter="none"), rewards, correct).all()


def test_sequential_stages_restrict_the_sampling_weights():
    from types import SimpleNamespace

    from mtgrpo_jax.train.trainer import Trainer

    cfg = load_config(ROOT / "configs" / "paper" / "exp1_sequential_zac.yaml")
    fake = SimpleNamespace(cfg=cfg, names=[t.name for t in cfg.tasks], weights=np.full(3, 1 / 3, np.float32))
    order = ["zebra-medium", "arc_1d-medium", "countdown-medium"]
    for step, stage in ((1, 0), (240, 0), (241, 1), (480, 1), (481, 2), (720, 2)):
        w = Trainer._sampling_weights(fake, step)
        np.testing.assert_allclose(w, np.asarray(fake.names) == order[stage], atol=1e-7)
    fake.cfg = load_config(ROOT / "configs" / "paper" / "exp1.yaml")
    np.testing.assert_array_equal(Trainer._sampling_weights(fake, 5), fake.weights)
