"""Metrics sinks: JSONL round trip and resume truncation, TensorBoard event contents, W&B hand-off,
primary-only writing, the progress bar's figures and the peak-memory helper."""

from __future__ import annotations

import io
import json
import math
import struct
import sys
import types
import warnings

import numpy as np
import pytest

from mtgrpo_jax.train import metrics as M


def _writer(run_dir, **kw):
    kw.setdefault("tensorboard", False)
    kw.setdefault("console", False)
    kw.setdefault("is_primary", True)
    return M.MetricsWriter(run_dir, **kw)


def _read_events(run_dir):
    """(step, tag, value) of every scalar plus purge markers, parsed straight from the TFRecord files, so
    the test does not depend on TensorBoard's own reader."""
    from tensorboardX.proto import event_pb2

    scalars, purges = [], []
    for path in sorted((run_dir / M.TENSORBOARD_DIR).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            if event.HasField("session_log"):
                purges.append(event.step)
            for value in event.summary.value:
                scalars.append((event.step, value.tag, value.simple_value))
    return scalars, purges


def test_jsonl_round_trip_converts_values_and_adds_bookkeeping(tmp_path):
    import jax.numpy as jnp

    with _writer(tmp_path) as w:
        written = w.write(
            3,
            {
                "task/countdown-l1/accuracy": np.float32(0.25),
                "task/zebra_3x3/groups_generated": np.int64(7),
                "sampler/budget_exhausted": np.bool_(True),
                "loss/policy": jnp.asarray(1.5),
                "train/grad_norm": float("nan"),
                "memory/source": "host_rss",
                "rollout/lengths": np.array([3, 4]),
            },
        )
    records = M.read_metrics(tmp_path)
    assert len(records) == 1
    rec = records[0]
    assert rec["step"] == 3 and isinstance(rec["time"], float) and rec["elapsed_s"] >= 0
    assert rec["task/countdown-l1/accuracy"] == pytest.approx(0.25)
    assert rec["task/zebra_3x3/groups_generated"] == 7 and isinstance(rec["task/zebra_3x3/groups_generated"], int)
    assert rec["sampler/budget_exhausted"] is True
    assert rec["loss/policy"] == 1.5
    assert rec["train/grad_norm"] is None  # strict JSON: NaN becomes null in the file ...
    assert math.isnan(written["train/grad_norm"])  # ... but the sinks saw the NaN
    assert rec["rollout/lengths"] == [3, 4]
    # Each line is strict JSON (no NaN tokens), readable by any tool.
    for line in (tmp_path / M.METRICS_FILE).read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_bad_values_give_one_line_errors_naming_the_key(tmp_path):
    with _writer(tmp_path) as w:
        with pytest.raises(ValueError, match="'loss/x'.*unsupported value type"):
            w.write(1, {"loss/x": object()})
        with pytest.raises(ValueError, match="'loss/y'.*shape"):
            w.write(1, {"loss/y": np.zeros((2, 2))})
        with pytest.raises(ValueError, match="record has step 2"):
            w.write(1, {"step": 2})
        with pytest.raises(ValueError, match="step must be an int"):
            w.write(1.0, {})
    with pytest.raises(ValueError, match="after close"):
        w.write(1, {})


def test_non_primary_process_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    with M.MetricsWriter(run_dir, is_primary=False, tensorboard=True, console=True) as w:
        assert w.write(1, {"task/a/reward": 1.0}) is None
    assert not run_dir.exists()


def test_default_primary_is_process_zero(tmp_path):
    with M.MetricsWriter(tmp_path, tensorboard=False, console=False) as w:
        assert w.is_primary  # a single-process run is process 0


def test_truncate_after_drops_later_steps_and_a_torn_line(tmp_path):
    with _writer(tmp_path) as w:
        for step in range(1, 6):
            w.write(step, {"task/a/reward": float(step)})
            if step % 2 == 0:
                w.write(step, {"split": "eval", "eval/a/accuracy": step / 10})
    path = tmp_path / M.METRICS_FILE
    with open(path, "a") as f:
        f.write('{"step": 6, "task/a/rew')  # killed mid-write
    with pytest.warns(UserWarning, match="torn last line"):
        assert len(M.read_metrics(tmp_path)) == 7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dropped = M.truncate_after(tmp_path, 3)
    assert dropped == 3  # steps 4 (train+eval) and 5; the torn line is not a record
    records = M.read_metrics(tmp_path)
    assert [(r["step"], r.get("split")) for r in records] == [(1, None), (2, None), (2, "eval"), (3, None)]
    assert path.read_text().endswith("\n")
    assert M.truncate_after(tmp_path, 10) == 0
    assert M.truncate_after(tmp_path / "missing", 0) == 0
    assert [r["step"] for r in M.read_metrics(tmp_path, split="eval")] == [2]
    assert [r["step"] for r in M.read_metrics(tmp_path, split="train")] == [1, 2, 3]


def test_corrupt_line_in_the_middle_is_refused(tmp_path):
    (tmp_path / M.METRICS_FILE).write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: corrupt"):
        M.read_metrics(tmp_path)
    with pytest.raises(ValueError, match="no metrics file"):
        M.read_metrics(tmp_path / "nowhere")


def test_resume_gives_the_history_of_an_uninterrupted_run(tmp_path):
    """Write 1..6, 'crash', resume from a checkpoint at step 4, write 5..8: the JSONL holds each step
    once, in order, elapsed_s carries on from the checkpointed record, TensorBoard is told to purge."""
    with _writer(tmp_path, tensorboard=True) as w:
        for step in range(1, 7):
            w.write(step, {"task/a/reward": float(step), "elapsed_s": 10.0 * step})
    with _writer(tmp_path, tensorboard=True, resume_step=4) as w:
        for step in range(5, 9):
            w.write(step, {"task/a/reward": float(step) + 100})
    records = M.read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["task/a/reward"] for r in records] == [1, 2, 3, 4, 105, 106, 107, 108]
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed[3] == 40.0 and all(40.0 <= e < 45.0 for e in elapsed[4:]) and elapsed == sorted(elapsed)
    scalars, purges = _read_events(tmp_path)
    assert purges == [5]  # tensorboard drops the stale steps 5, 6 of the first run
    assert "task/a/reward" in {t for _, t, _ in scalars}
    # Fresh start in a used directory.
    with _writer(tmp_path, resume_step=-1) as w:
        w.write(1, {"task/a/reward": 0.0})
    assert [r["step"] for r in M.read_metrics(tmp_path)] == [1]


def test_tensorboard_gets_numeric_scalars_only(tmp_path):
    with _writer(tmp_path, tensorboard=True) as w:
        w.write(1, {"task/countdown-l1/weight": 0.25, "memory/source": "device", "split": "train"})
        w.write(2, {"split": "eval", "eval/countdown-l1/pass@8": 0.75, "eval/worst_accuracy": 0.5, "x/flag": True})
    scalars, _ = _read_events(tmp_path)
    assert sorted(scalars) == [
        (1, "task/countdown-l1/weight", 0.25),
        (2, "eval/countdown-l1/pass_at_8", 0.75),
        (2, "eval/worst_accuracy", 0.5),
        (2, "x/flag", 1.0),
    ]


def test_wandb_sink_when_installed_and_enabled(tmp_path, monkeypatch):
    calls = {"init": [], "log": [], "finish": 0}

    class FakeRun:
        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self):
            calls["finish"] += 1

    def init(**kwargs):
        calls["init"].append(kwargs)
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with _writer(tmp_path, wandb={"project": "p"}) as w:
        w.write(1, {"task/a/reward": 0.5, "memory/source": "host_rss"})
    with _writer(tmp_path, wandb={"project": "p"}, resume_step=1) as w:
        w.write(2, {"task/a/reward": 0.7})
    first, second = calls["init"]
    assert first["project"] == "p" and first["resume"] == "allow"
    assert second["id"] == first["id"] == (tmp_path / M.WANDB_ID_FILE).read_text().strip()
    assert calls["log"] == [(1, {"task/a/reward": 0.5}), (2, {"task/a/reward": 0.7})]
    assert calls["finish"] == 2


def test_wandb_requested_but_missing_is_skipped_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import raises ImportError
    with pytest.warns(UserWarning, match="wandb package is not installed"):
        w = _writer(tmp_path, wandb={"project": "p"})
    w.write(1, {"a/b": 1.0})
    w.close()
    assert M.read_metrics(tmp_path)[0]["a/b"] == 1.0


def test_per_task_parses_free_form_names():
    rec = {
        "task/countdown-l1/accuracy": 0.1,
        "task/zebra_3x3/accuracy": 0.2,
        "task/math/gsm8k/accuracy": 0.3,
        "task/countdown-l1/reward": 9.0,
        "eval/worst_accuracy": 0.0,
        "eval/arc/accuracy": 0.4,
    }
    assert M.per_task(rec, "accuracy") == {"countdown-l1": 0.1, "zebra_3x3": 0.2, "math/gsm8k": 0.3}
    assert M.per_task(rec, "accuracy", prefix="eval/") == {"arc": 0.4}


def test_progress_bar_shows_the_key_figures():
    train = {
        "task/a/accuracy": 0.5,
        "task/b/accuracy": 0.25,
        "task/a/reward": 0.6,
        "task/b/reward": 0.2,
        "task/a/weight": 0.7,
        "task/b/weight": 0.3,
        "rollout/tokens_per_s": 12345.0,
    }
    assert M.key_figures(train) == "worst(train)=0.250 reward=0.400 z=0.70/0.30 tok/s=12.3k"
    assert M.key_figures(train, last_eval_worst=0.125).startswith("worst=0.125 ")
    out = io.StringIO()
    bar = M.ProgressBar(10, file=out)
    bar.update(3, train)
    bar.update(3, {"split": "eval", "eval/worst_accuracy": 0.125, "eval/mean_accuracy": 0.3, "eval/a/accuracy": 0.475})
    bar.update(4, train)
    bar.close()
    text = out.getvalue()
    assert "4/10" in text and "worst=0.125 reward=0.400 z=0.70/0.30 tok/s=12.3k" in text
    assert "step 3 eval: worst=0.125 mean=0.300 | a=0.475" in text


def test_peak_memory_falls_back_to_host_rss_on_cpu():
    import resource

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rec = M.memory_metrics()
    assert rec["memory/source"] == "host_rss"  # CPU devices keep no memory statistics
    assert rec["memory/peak_bytes"] >= rss_kib * 1024 > 0
    assert M.peak_memory_bytes() >= rss_kib * 1024


def test_peak_memory_uses_the_fullest_device_when_stats_exist(monkeypatch):
    import jax

    class Dev:
        def __init__(self, peak):
            self.peak = peak

        def memory_stats(self):
            return {"peak_bytes_in_use": self.peak, "bytes_in_use": 1}

    monkeypatch.setattr(jax, "local_devices", lambda: [Dev(5), Dev(11), Dev(7)])
    assert M.memory_metrics() == {"memory/peak_bytes": 11, "memory/source": "device"}
    assert M.peak_memory_bytes() == 11


def test_run_dir_must_be_a_posix_path():
    with pytest.raises(ValueError, match="POSIX run directory"):
        M.MetricsWriter("gs://bucket/run", is_primary=True)
