"""What a real run meets: a step whose filtered batch is empty is skipped (no update over padding) and counted;
a latest checkpoint that no longer reads back is set aside and the run resumes from the newest one that does."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from mtgrpo_jax.config import load_config


def _overrides(run_dir: Path, data_dir: Path, **extra) -> list[str]:
    base = {
        "output_dir": str(run_dir),
        "data_dir": str(data_dir),
        "model.init": "random",
        "model.dtype": "float32",
        "model.overrides": "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
        "num_key_value_heads: 1}",
        "tasks": "[{name: countdown, family: countdown, train: {level: 1, n: 12, seed: 2}, eval: {level: 1, n: 4, seed: 8}}]",
        "rollout.max_new_tokens": 8,
        "rollout.prompt_style": "compact",
        "rollout.prompt_buckets": "[256]",
        "rollout.batch_buckets": "[8]",
        "sampler.batch_size": 4,
        "sampler.group_size": 4,
        "sampler.resample_budget": 1,
        "optim.mini_batches": 2,
        "optim.learning_rate": 1e-3,
        "train.steps": 2,
        "train.eval_every": 0,
        "train.checkpoint_every": 1,
        "eval.n": 2,
        "eval.max_examples": 2,
        "logging.console": False,
        "logging.tensorboard": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_a_step_with_no_valid_rows_skips_the_update_and_is_counted(tmp_path, capsys):
    from mtgrpo_jax.train.trainer import Trainer

    # A random-init model never writes a box: every group's rewards are equal, the strict filter keeps none.
    trainer = Trainer(
        load_config(None, _overrides(tmp_path / "run", tmp_path / "data", **{"sampler.filter": "strict"}))
    )
    before = jax.tree.map(np.asarray, trainer.params)
    opt_before = jax.tree.map(np.asarray, trainer.opt_state)
    record = trainer.train_step()
    assert record["sampler/groups_kept"] == 0 and record["train/valid_rows"] == 0
    assert record["train/empty_step"] == 1 and record["step"] == 1
    assert record["train/loss"] == 0.0 and record["train/skipped"] == 0  # the update's keys, no update ran
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, trainer.params), before)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, trainer.opt_state), opt_before)
    assert "step 1: no valid rows after filtering; policy update skipped" in capsys.readouterr().out


@pytest.mark.slow
def test_an_unreadable_latest_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous(tmp_path, capsys):
    from mtgrpo_jax.train.trainer import Trainer

    run = tmp_path / "run"
    overrides = _overrides(run, tmp_path / "data", **{"sampler.filter": "none", "logging.console": True})
    assert Trainer(load_config(None, overrides)).run() == {"status": "done", "step": 2}
    out = capsys.readouterr().out
    assert "[mtgrpo] prompts: instruct model (the tokenizer has a chat template)" in out
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["kind"] == "instruct" and saved["rollout"]["template"] == "chat"
    assert saved["rollout"]["prompt_style"] == "compact"

    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["1", "2"]
    truncated = 0
    for f in (ckpts / "2").rglob("*"):
        if f.is_file() and "arrays" in f.relative_to(ckpts / "2").parts and f.stat().st_size > 16:
            with open(f, "r+b") as h:
                h.truncate(f.stat().st_size // 2)
            truncated += 1
    assert truncated > 0

    trainer = Trainer(load_config(None, overrides[:-1] + ["logging.console=False", "train.steps=3"]))
    assert trainer.run() == {"status": "done", "step": 3}
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "could not be read" in line]
    assert len(lines) == 1 and lines[0].startswith("[mtgrpo] checkpoint step 2 could not be read (")
    assert "resumed from step 1" in out
    assert (ckpts / "2.unreadable").is_dir()  # left in place, renamed aside
    assert sum(1 for f in (ckpts / "2.unreadable").rglob("*") if f.is_file()) > 0
    assert [r["step"] for r in trainer.history if r.get("split") != "eval" and "train/valid_rows" in r] == [1, 2, 3]
