"""A real pretrained model end to end: SmolLM2-135M-Instruct from its GGUF file (see conftest.py), converted by
`mtgrpo convert`, against transformers' own reading of the same GGUF.

Tolerances (float32 on CPU; the two sides differ only in summation order): log-softmax within 2e-3 of
transformers at every position of a 40-token prompt with identical argmax; greedy decoding identical for 64
tokens; the rollout engine's token log-probs and the trainer's agree to a ratio in [0.95, 1.05] on every token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("real_weights")]

ROOT = Path(__file__).resolve().parents[2]
RELEASED = ROOT / "data" / "mtgrpo_paper"
LOGSOFTMAX_ATOL = 2e-3
RATIO_BAND = (0.95, 1.05)
QUESTION = "Using the numbers [3, 5, 7], create an equation that equals 22. Return the final answer in \\boxed{}."


def _prompt_ids(tokenizer) -> list[int]:
    from mtgrpo_jax.models.tokenizer import encode_prompt

    return encode_prompt(tokenizer, [{"role": "user", "content": QUESTION}], template="chat")


def test_convert_writes_the_hf_layout_with_tokenizer_and_template(smollm2_dir):
    from mtgrpo_jax.models import ModelConfig, load_tokenizer

    cfg = ModelConfig.from_hf(smollm2_dir)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert cfg.num_key_value_heads == 3 and cfg.tie_word_embeddings
    assert 134e6 < cfg.num_params() < 135e6
    tok = load_tokenizer(smollm2_dir)
    assert len(tok) == 49152 and tok.chat_template and "<|im_start|>" in tok.chat_template


def test_logits_match_transformers(smollm2_model, smollm2_reference, smollm2_dir):
    import torch

    from mtgrpo_jax.models import load_tokenizer

    ref_model, ref_tok = smollm2_reference
    tok = load_tokenizer(smollm2_dir)
    ids = _prompt_ids(tok)
    assert ids == _prompt_ids(ref_tok)  # the converted tokenizer encodes as transformers' GGUF tokenizer does
    with torch.no_grad():
        ref = torch.log_softmax(ref_model(torch.tensor([ids])).logits.float(), -1)[0].numpy()
    ours = np.asarray(jax.nn.log_softmax(smollm2_model(jnp.asarray([ids])), -1))[0]
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
    assert np.abs(ours - ref).max() < LOGSOFTMAX_ATOL


def test_greedy_generation_matches_transformers_for_64_tokens(smollm2_model, smollm2_reference, smollm2_dir):
    import torch

    from mtgrpo_jax.models import load_tokenizer
    from mtgrpo_jax.rollout import Buckets, RolloutEngine, SamplingParams

    ref_model, _ = smollm2_reference
    tok = load_tokenizer(smollm2_dir)
    ids = _prompt_ids(tok)
    with torch.no_grad():
        ref = ref_model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=64,
            min_new_tokens=64,
            pad_token_id=tok.pad_token_id,
        )
    ref_new = ref[0, len(ids) :].tolist()
    engine = RolloutEngine(smollm2_model, tok, Buckets(prompt_lengths=(64,), batch_sizes=(1,)))
    out = engine.generate(
        [ids], SamplingParams(n=1, temperature=0.0, max_new_tokens=64, ignore_eos=True), jax.random.key(0)
    )
    ours = np.asarray(out.tokens)[0].tolist()
    assert len(ref_new) == 64
    assert ours == ref_new


def test_save_load_round_trip_is_exact(smollm2_model, smollm2_dir, tmp_path):
    from flax import nnx
    from safetensors.numpy import load_file

    from mtgrpo_jax.models import load_pretrained, save_pretrained

    save_pretrained(smollm2_model, tmp_path / "saved")
    saved, converted = load_file(tmp_path / "saved" / "model.safetensors"), load_file(smollm2_dir / "model.safetensors")
    assert saved.keys() == converted.keys()
    for name in converted:
        np.testing.assert_array_equal(saved[name], converted[name], err_msg=name)
    again = load_pretrained(tmp_path / "saved", dtype="float32")
    a = dict(nnx.to_flat_state(nnx.state(smollm2_model, nnx.Param)))
    b = dict(nnx.to_flat_state(nnx.state(again, nnx.Param)))
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(np.asarray(a[path].get_value()), np.asarray(b[path].get_value()))


def _cli(args: list[str], timeout: int = 1500) -> subprocess.CompletedProcess:
    """`mtgrpo ARGS` in a fresh process on one CPU device. The test process has 8 fake devices, where the
    rollout's serving layout would hold 8 replicas of the model: a real model wants the machine's own layout."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    done = subprocess.run(
        [sys.executable, "-m", "mtgrpo_jax.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_training_steps_move_parameters_with_engine_trainer_ratios_in_band(smollm2_dir, tmp_path):
    from safetensors.numpy import load_file

    run = tmp_path / "run"
    overrides = {
        "output_dir": str(run),
        "data_dir": str(tmp_path / "data"),
        "model.path": str(smollm2_dir),
        "model.dtype": "float32",
        "tasks": f"[{{name: countdown-l1, family: countdown, train: {{path: {RELEASED / 'test_countdown.parquet'}, "
        f"level: 1, n: 16}}}}]",
        "rollout.max_new_tokens": 24,
        "rollout.prompt_buckets": "[128]",
        "rollout.batch_buckets": "[4]",
        "sampler.kind": "plain",
        "sampler.filter": "none",
        "sampler.batch_size": 4,
        "sampler.group_size": 2,
        "optim.mini_batches": 1,
        "optim.learning_rate": 1e-5,
        "optim.grad_clip": "null",
        "train.steps": 2,
        "train.eval_every": 0,
        "train.checkpoint_every": 0,
        "eval.n": 1,
        "eval.max_examples": 1,
        "logging.tensorboard": False,
    }
    done = _cli(["train", *[f"{k}={v}" for k, v in overrides.items()]])
    assert "[mtgrpo] prompts: instruct model (the tokenizer has a chat template)" in done.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/valid_rows" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for rec in steps:
        assert rec["train/valid_rows"] == 8 and rec["train/skipped"] == 0 and rec["train/empty_step"] == 0
        # one mini-batch: its ratios are those of the trainer's log-probs to the rollout engine's, before any update
        assert RATIO_BAND[0] <= rec["train/ratio_min"] <= rec["train/ratio_max"] <= RATIO_BAND[1], rec
    before, after = load_file(smollm2_dir / "model.safetensors"), load_file(run / "hf_final" / "model.safetensors")
    assert before.keys() == after.keys()
    moved = [n for n in before if not np.array_equal(before[n], after[n])]
    assert len(moved) > len(before) // 2  # the update reached (nearly) every tensor


def test_eval_cli_on_released_countdown(smollm2_dir):
    done = _cli(
        [
            "eval",
            str(smollm2_dir),
            "--tasks",
            str(RELEASED / "test_countdown.parquet"),
            "--max-examples",
            "2",
            "--n",
            "2",
            "--max-new-tokens",
            "32",
            "--json",
            "rollout.batch_buckets=[4]",
            "rollout.prompt_buckets=[128,256]",
        ]
    )
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(out["tasks"]) == {f"countdown-l{level}" for level in (1, 2, 3, 4)}
    for vals in out["tasks"].values():
        assert 0.0 <= vals["accuracy"] <= 1.0
    assert out["prompt_style"]["kind"] == "instruct" and out["dtype"] == "float32" and out["n"] == 2
