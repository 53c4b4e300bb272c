"""`mtgrpo eval`: per-task accuracy and pass@k on the released test sets, worst/average, the relative change
against a baseline run, and steps to worst-task thresholds from a run's history."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mtgrpo_jax.train.eval_cli import main

ROOT = Path(__file__).resolve().parents[2]
RELEASED = ROOT / "data" / "mtgrpo_paper"


def _write_history(run_dir: Path, evals: list[tuple[int, float, dict[str, float]]]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step, elapsed, accs in evals:
            rec = {"step": step, "time": 0.0, "elapsed_s": elapsed, "split": "eval"}
            rec.update({f"eval/{k}/accuracy": v for k, v in accs.items()})
            rec["eval/worst_accuracy"] = min(accs.values())
            rec["eval/mean_accuracy"] = sum(accs.values()) / len(accs)
            f.write(json.dumps(rec) + "\n")


@pytest.mark.slow
def test_eval_on_released_sets_with_baseline_and_thresholds(tmp_path, capsys):
    # A "run directory": the bundled tiny model saved in HF layout plus an evaluation history.
    from mtgrpo_jax.models import Transformer, load_tokenizer, save_pretrained, tiny_config

    import jax.numpy as jnp
    from flax import nnx

    run = tmp_path / "run"
    model = Transformer(tiny_config(), rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    save_pretrained(model, run / "hf_final")
    load_tokenizer().save_pretrained(run / "hf_final")
    names = ["countdown-l1", "countdown-l2"]
    _write_history(run, [(0, 0.0, {n: 0.1 for n in names}), (10, 1800.0, {n: 0.35 for n in names}),
                         (20, 3600.0, {"countdown-l1": 0.6, "countdown-l2": 0.55})])
    base = tmp_path / "base"
    _write_history(base, [(20, 10.0, {"countdown-l1": 0.5, "countdown-l2": 0.25})])
    subset = tmp_path / "countdown.parquet"
    shutil.copy(RELEASED / "test_countdown.parquet", subset)

    code = main([str(run), "--tasks", str(subset), "--n", "4", "--pass-k", "1,4", "--max-examples", "3",
                 "--max-new-tokens", "8", "--baseline", str(base), "--thresholds", "0.3,0.5,0.9", "--json",
                 "rollout.prompt_style=compact", "rollout.prompt_buckets=[128,256]", "rollout.batch_buckets=[8]"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["tasks"]) == {"countdown-l1", "countdown-l2", "countdown-l3", "countdown-l4"}
    for vals in out["tasks"].values():
        assert 0.0 <= vals["accuracy"] <= vals["pass@4"] <= 1.0
    assert out["worst_accuracy"] == min(v["accuracy"] for v in out["tasks"].values())
    assert out["relative_change_vs_baseline"]["per_task"].keys() == {"countdown-l1", "countdown-l2"}
    hits = out["steps_to_worst_task_threshold"]
    assert hits["0.3"] == {"step": 10, "hours": 0.5} and hits["0.5"]["step"] == 20 and hits["0.9"]["step"] is None


def test_eval_bad_input_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "target not found" in capsys.readouterr().err
    assert main(["tiny", "--tasks", "countdown:nine"]) == 2
    err = capsys.readouterr().err.strip()
    assert "FAMILY:LEVEL:N" in err and len(err.splitlines()) == 1
    assert main(["tiny", "--tasks", str(tmp_path / "nope.parquet")]) == 2
    assert "data file not found" in capsys.readouterr().err
