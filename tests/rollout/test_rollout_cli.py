"""`mtgrpo generate` and `mtgrpo bench rollout` entry points."""

import json

import pytest

from mtgrpo_jax.rollout.cli import generate_main


def test_generate_runs_with_no_arguments_on_the_bundled_tiny_model(capsys):
    assert generate_main([], prog="mtgrpo generate") == 0
    out = capsys.readouterr().out
    assert out.count("=== prompt") == 2 and out.count("--- sample") == 4  # 2 default prompts x n=2


def test_generate_json_and_clear_errors(capsys, tmp_path):
    assert generate_main(["--prompt", "hi", "--n", "1", "--temperature", "0", "--max-new-tokens", "3", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 1 and rows[0]["prompt"] == "hi" and 1 <= len(rows[0]["tokens"]) <= 3
    with pytest.raises(SystemExit):
        generate_main(["--n", "0"])
    assert "n must be a positive integer" in capsys.readouterr().err
    assert generate_main(["--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_quick_json(capsys):
    pytest.importorskip("torch")
    from mtgrpo_jax.rollout.bench import main

    assert main(["--quick", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    row = report["sizes"]["10m"]
    assert row["tokens_per_s"] > 0 and row["reference_tokens_per_s"] > 0
    assert row["ratio_vs_transformers"] == pytest.approx(row["tokens_per_s"] / row["reference_tokens_per_s"], rel=0.01)
