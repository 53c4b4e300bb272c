"""`mtgrpo eval`: per-task accuracy and pass@k on the released test sets, worst/average, the relative change
against a baseline run, and steps to worst-task thresholds from a run's history."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
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
    import jax.numpy as jnp
    from flax import nnx

    from mtgrpo_jax.models import Transformer, load_tokenizer, save_pretrained, tiny_config

    run = tmp_path / "run"
    model = Transformer(tiny_config(), rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    save_pretrained(model, run / "hf_final")
    load_tokenizer().save_pretrained(run / "hf_final")
    names = ["countdown-l1", "countdown-l2"]
    _write_history(
        run,
        [
            (0, 0.0, {n: 0.1 for n in names}),
            (10, 1800.0, {n: 0.35 for n in names}),
            (20, 3600.0, {"countdown-l1": 0.6, "countdown-l2": 0.55}),
        ],
    )
    base = tmp_path / "base"
    _write_history(base, [(20, 10.0, {"countdown-l1": 0.5, "countdown-l2": 0.25})])
    subset = tmp_path / "countdown.parquet"
    shutil.copy(RELEASED / "test_countdown.parquet", subset)

    code = main(
        [
            str(run),
            "--tasks",
            str(subset),
            "--n",
            "4",
            "--pass-k",
            "1,4",
            "--max-examples",
            "3",
            "--max-new-tokens",
            "8",
            "--baseline",
            str(base),
            "--thresholds",
            "0.3,0.5,0.9",
            "--json",
            "rollout.prompt_style=compact",
            "rollout.prompt_buckets=[128,256]",
            "rollout.batch_buckets=[8]",
        ]
    )
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


# --- rough edges a real model dir hits ------------------------------------------------------------
def _tiny_model_dir(
    path: Path, *, vocab_size: int | None = None, tokenizer_files=("tokenizer.json",), dtype="float32"
) -> Path:
    import jax.numpy as jnp
    from flax import nnx

    from mtgrpo_jax.models import ModelConfig, Transformer, save_pretrained, tiny_config
    from mtgrpo_jax.models.tokenizer import TINY_TOKENIZER_DIR

    cfg = tiny_config()
    if vocab_size is not None:
        cfg = ModelConfig.from_hf({**cfg.to_hf_dict(), "vocab_size": vocab_size})
    model = Transformer(cfg, rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
    save_pretrained(model, path)
    for name in tokenizer_files:
        shutil.copy(TINY_TOKENIZER_DIR / name, path / name)
    return path


def test_eval_loads_a_lone_tokenizer_json_and_picks_float32_on_cpu(tmp_path):
    from mtgrpo_jax.config import from_dict
    from mtgrpo_jax.train.eval_cli import _load_model, eval_dtype

    model_dir = _tiny_model_dir(tmp_path / "m", dtype="bfloat16")
    cfg = from_dict({})
    assert cfg.model.dtype == "bfloat16" and cfg.eval.dtype == "auto"
    assert eval_dtype(cfg) == "float32"  # the tests run on CPU
    model, tok, _ = _load_model(model_dir, cfg)
    assert Path(tok.name_or_path) == model_dir  # the directory's own tokenizer.json, not the bundled one
    assert model.param_dtype == np.dtype("float32")
    told = from_dict({"eval": {"dtype": "bfloat16"}})
    assert eval_dtype(told) == "bfloat16" and _load_model(model_dir, told)[0].param_dtype == jnp.bfloat16


def test_eval_refuses_a_tokenizer_that_does_not_fit_the_model(tmp_path, capsys):
    model_dir = _tiny_model_dir(tmp_path / "m", vocab_size=1024)  # the tokenizer has 2048 tokens
    assert main([str(model_dir), "--tasks", "countdown:1:2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "2048 tokens do not fit the model's vocab_size 1024" in err and len(err.splitlines()) == 1


def test_eval_flags_do_not_override_config_unless_given_and_names_line_up_with_runs(tmp_path, capsys):
    from mtgrpo_jax.config import from_dict, save_config

    # A finished run trained on countdown level 1 under its own name, with an evaluation history.
    run = tmp_path / "run"
    _tiny_model_dir(
        run / "hf_final", tokenizer_files=("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    )
    task = {
        "name": "countdown-easy",
        "family": "countdown",
        "train": {"level": 1, "n": 4},
        "eval": {"path": str(RELEASED / "test_countdown.parquet"), "level": 1},
    }
    save_config(
        from_dict(
            {
                "tasks": [task],
                "eval": {"n": 3, "max_examples": 1},
                "rollout": {
                    "max_new_tokens": 4,
                    "prompt_style": "compact",
                    "prompt_buckets": [128],
                    "batch_buckets": [8],
                },
            }
        ),
        run / "config.yaml",
    )
    _write_history(run, [(0, 0.0, {"countdown-easy": 0.0})])
    subset = tmp_path / "countdown.parquet"
    shutil.copy(RELEASED / "test_countdown.parquet", subset)

    assert main([str(run), "--tasks", str(subset), "--baseline", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] == 3  # eval.n from the run's config: no flag default overrides it
    assert "countdown-easy" in out["tasks"] and "countdown-l1" not in out["tasks"]  # the run's name for level 1
    assert "countdown-l2" in out["tasks"]  # levels the run never trained keep the generic name
    assert list(out["relative_change_vs_baseline"]["per_task"]) == ["countdown-easy"]

    assert main([str(run), "--tasks", str(subset), "--n", "2", "--json", "eval.n=5"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 2  # a given flag wins
    assert main([str(run), "--tasks", str(subset), "--json", "eval.n=5"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 5
