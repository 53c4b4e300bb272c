"""`mtgrpo bench step --json` runs both methods and reports consistent phase times and ratios."""

import json

import pytest

from mtgrpo_jax.train.bench import main


@pytest.mark.slow
def test_bench_step_json(tmp_path, capsys):
    code = main(
        [
            "--json",
            "--steps",
            "1",
            "--warmup",
            "1",
            f"data_dir={tmp_path}",
            "model.overrides={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, "
            "num_key_value_heads: 1}",
            "sampler.batch_size=4",
            "sampler.group_size=4",
            "rollout.batch_buckets=[8,16]",
            "tasks.0.train.n=16",
            "tasks.1.train.n=16",
            "tasks.2.train.n=16",
        ],
        prog="bench",
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for method in ("mt_grpo", "dapo"):
        r = out[method]
        parts = sum(
            r[f"time/{p}"]
            for p in ("sampling", "rollout", "scoring", "old_logprobs", "update", "improvement", "weights")
        )
        assert 0 < parts <= r["time/step"] * 1.01
    assert sorted(out["estimators"]) == ["fresh", "minibatch_sum", "step_mean"]
    # only the step_mean estimator runs its own forward after the update
    assert out["dapo"]["time/improvement"] == 0 < out["estimators"]["step_mean"]["time/improvement"]
    assert out["estimators"]["fresh"]["time/improvement"] == 0
    for r in out["estimators"].values():
        assert r["train_time_ratio_vs_dapo"] > 0 and r["step_time_ratio_vs_dapo"] > 0
    assert 0 < out["update_mfu_vs_measured_peak"] and out["matmul_peak_flops"] > 0
    assert 0 < out["mt_grpo_machinery_fraction"] < 1 and out["step_time_ratio_vs_dapo"] > 0
