"""Metrics sinks: one flat record per step, written as JSONL, TensorBoard events, optionally Weights &
Biases, and a console progress bar.

The record schema (the trainer emits it, `report.py` and `eval_metrics.py` read it): one JSON object per
line of RUN_DIR/metrics.jsonl with flat "/"-separated keys. Every record has "step" (int), "time" (unix
seconds) and "elapsed_s" (seconds of run time since the run started, carried across resumes). Training
records hold `task/<name>/{reward,accuracy,zero_grad_rate,weight,share,groups_generated}`, `sampler/...`,
`rollout/...`, `time/<phase>`, `memory/peak_bytes` (+ `memory/source`), `loss/...`, `train/...`.
Evaluation records carry "split": "eval" and `eval/<name>/accuracy`, `eval/<name>/pass@k`,
`eval/worst_accuracy`, `eval/mean_accuracy`. Task names are free-form (they may hold '-', '_', even '/'),
so they are recovered by matching a known prefix and suffix, never by splitting on "/".

Non-finite floats are written to the JSONL as `null` (strict JSON that any tool can read); TensorBoard
and W&B get the raw NaN/inf. Only the primary process (jax.process_index() == 0) writes anything, so a
multi-host run produces one copy of each file.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import sys
import time
import uuid
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id.txt"
# Keys every record carries; they are bookkeeping, not plotted as scalars.
BOOKKEEPING_KEYS = ("step", "time", "elapsed_s", "split")
EVAL_SPLIT = "eval"


# ----------------------------------------------------------------------------------------------------
# Schema helpers
# ----------------------------------------------------------------------------------------------------


def per_task(record: Mapping[str, Any], suffix: str, prefix: str = "task/") -> dict[str, Any]:
    """`{name: value}` for every key `<prefix><name>/<suffix>` of one record, in record order.

    Matching on prefix and suffix (rather than splitting on "/") keeps task names with '/' intact, and
    the aggregate keys (`eval/worst_accuracy`) never match because they lack the "/<suffix>" ending.
    """
    tail = "/" + suffix
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key.startswith(prefix) and key.endswith(tail) and len(key) > len(prefix) + len(tail):
            out[key[len(prefix) : -len(tail)]] = value
    return out


def is_eval(record: Mapping[str, Any]) -> bool:
    return record.get("split") == EVAL_SPLIT


def _to_python(key: str, value: Any) -> Any:
    """A JSON-ready Python value (NaN kept as float here; the JSONL sink turns it into null).

    Accepts Python and NumPy scalars, strings, None, 0-d or 1-element arrays (jax arrays included, which
    costs a device sync, so the trainer should hand over host values) and flat sequences of scalars.
    """
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (list, tuple)):
        return [_to_python(key, v) for v in value]
    if hasattr(value, "__array__") or isinstance(value, np.ndarray):
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"metric {key!r}: unsupported array dtype {arr.dtype}")
        if arr.size == 1:
            return _to_python(key, arr.reshape(()).item())
        if arr.ndim != 1:
            raise ValueError(f"metric {key!r}: only scalars and 1-D arrays can be logged, got shape {arr.shape}")
        return [_to_python(key, v) for v in arr.tolist()]
    raise ValueError(f"metric {key!r}: unsupported value type {type(value).__name__}")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _is_scalar_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, str)


_TB_INVALID = re.compile(r"[^-/\w.]")


def tensorboard_tag(key: str) -> str:
    """TensorBoard only accepts [-/\\w.] in tags; map the rest ourselves ('pass@8' -> 'pass_at_8') so the
    names stay readable and tensorboardX does not log a warning per key."""
    return _TB_INVALID.sub("_", key.replace("@", "_at_")).lstrip("/")


# ----------------------------------------------------------------------------------------------------
# JSONL file: read, truncate
# ----------------------------------------------------------------------------------------------------


def _metrics_path(run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir)
    return path if path.suffix == ".jsonl" else path / METRICS_FILE


def _parse_lines(path: Path) -> tuple[list[dict], list[str]]:
    """Records and their raw lines. A torn last line (the process died mid-write) is dropped; a bad
    line anywhere else means the file is corrupt, which we refuse to paper over."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    records, raw = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                raise ValueError("not a record with an integer 'step'")
        except ValueError as e:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: ignoring a torn last line ({e})", stacklevel=3)
                break
            raise ValueError(f"{path}:{i + 1}: corrupt metrics line ({e})") from None
        records.append(rec)
        raw.append(line)
    return records, raw


def read_metrics(run_dir: str | os.PathLike, split: str | None = None) -> list[dict]:
    """All records of RUN_DIR/metrics.jsonl (or of a .jsonl path) in file order.

    split=None gives every record, "eval" only evaluation records, "train" only the others.
    """
    path = _metrics_path(run_dir)
    if not path.is_file():
        raise ValueError(f"no metrics file at {path}")
    records, _ = _parse_lines(path)
    if split is None:
        return records
    if split == EVAL_SPLIT:
        return [r for r in records if is_eval(r)]
    if split == "train":
        return [r for r in records if not is_eval(r)]
    raise ValueError(f"split must be None, 'train' or 'eval', got {split!r}")


def truncate_after(run_dir: str | os.PathLike, step: int) -> int:
    """Drop every record with step > `step` (and a torn last line); returns how many records were dropped.

    A resumed run calls this with its checkpoint's step before opening a writer, so the metric history
    matches an uninterrupted run exactly. The file is rewritten through a temporary file and
    `os.replace`, so a crash here leaves either the old or the new file, never a half-written one.
    """
    path = _metrics_path(run_dir)
    if not path.is_file():
        return 0
    records, raw = _parse_lines(path)
    keep = [line for rec, line in zip(records, raw) if rec["step"] <= step]
    dropped = len(records) - len(keep)
    with open(path, "rb") as f:
        original = f.read()
    new = "".join(line + "\n" for line in keep).encode("utf-8")
    if new != original:
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped


# ----------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------


def _device_peak_bytes() -> int | None:
    try:
        import jax

        peaks = []
        for device in jax.local_devices():
            stats = device.memory_stats()
            if stats and "peak_bytes_in_use" in stats:
                peaks.append(int(stats["peak_bytes_in_use"]))
        return max(peaks) if peaks else None
    except Exception:  # a backend without memory stats must never break the metrics
        return None


def _host_max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024


def peak_memory_bytes() -> int:
    """Peak memory of this process's accelerators: the largest `peak_bytes_in_use` over the local devices
    (the device that runs out first is the one that matters), or, where the backend keeps no memory
    statistics (CPU), the process's peak resident set size. `memory_metrics()` says which it was."""
    peak = _device_peak_bytes()
    return peak if peak is not None else _host_max_rss_bytes()


def memory_metrics() -> dict[str, Any]:
    """`{"memory/peak_bytes": n, "memory/source": "device" | "host_rss"}` for a training record."""
    peak = _device_peak_bytes()
    if peak is not None:
        return {"memory/peak_bytes": peak, "memory/source": "device"}
    return {"memory/peak_bytes": _host_max_rss_bytes(), "memory/source": "host_rss"}


# ----------------------------------------------------------------------------------------------------
# Console
# ----------------------------------------------------------------------------------------------------


def _fmt_rate(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def _finite(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if _is_scalar_number(v) and math.isfinite(v)]


def key_figures(record: Mapping[str, Any], last_eval_worst: float | None = None) -> str:
    """The progress bar's postfix: worst-task accuracy (last evaluation if any, else this step's training
    accuracy), mean reward over tasks, task weights z, rollout tokens/s."""
    parts = []
    if last_eval_worst is not None:
        parts.append(f"worst={last_eval_worst:.3f}")
    else:
        accs = _finite(per_task(record, "accuracy").values())
        if accs:
            parts.append(f"worst(train)={min(accs):.3f}")
    rewards = _finite(per_task(record, "reward").values())
    if rewards:
        parts.append(f"reward={sum(rewards) / len(rewards):.3f}")
    weights = _finite(per_task(record, "weight").values())
    if weights:
        parts.append("z=" + "/".join(f"{w:.2f}" for w in weights))
    tps = record.get("rollout/tokens_per_s")
    if _is_scalar_number(tps) and math.isfinite(tps):
        parts.append(f"tok/s={_fmt_rate(tps)}")
    return " ".join(parts)


def eval_summary(record: Mapping[str, Any]) -> str:
    """One line for an evaluation record: worst and mean accuracy and each task's accuracy."""
    accs = per_task(record, "accuracy", prefix="eval/")
    head = [f"step {record.get('step')} eval:"]
    for name, key in (("worst", "eval/worst_accuracy"), ("mean", "eval/mean_accuracy")):
        if _is_scalar_number(record.get(key)):
            head.append(f"{name}={record[key]:.3f}")
    tasks = " ".join(f"{n}={v:.3f}" for n, v in accs.items() if _is_scalar_number(v))
    return " ".join(head) + (f" | {tasks}" if tasks else "")


class ProgressBar:
    """A tqdm bar over training steps whose postfix shows the key figures of the latest record.

    Evaluation records do not advance the bar; they update the worst-task accuracy shown and print one
    summary line above the bar.
    """

    def __init__(self, total: int | None, *, initial: int = 0, file=None, disable: bool = False):
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self._bar = tqdm(
            total=total, initial=initial, unit="step", dynamic_ncols=True, file=file or sys.stderr, disable=disable
        )
        self._file = file or sys.stderr
        self._disable = disable
        self._last_eval_worst: float | None = None

    def update(self, step: int, record: Mapping[str, Any]) -> None:
        if is_eval(record):
            worst = record.get("eval/worst_accuracy")
            if _is_scalar_number(worst) and math.isfinite(worst):
                self._last_eval_worst = float(worst)
            if not self._disable:
                self._bar.write(eval_summary({**record, "step": step}), file=self._file)
            self._bar.set_postfix_str(self._postfix, refresh=True)
            return
        self._last_train = dict(record)
        if step > self._bar.n:
            self._bar.update(step - self._bar.n)
        self._bar.set_postfix_str(self._postfix, refresh=True)

    @property
    def _postfix(self) -> str:
        return key_figures(getattr(self, "_last_train", {}), self._last_eval_worst)

    def close(self) -> None:
        self._bar.close()


# ----------------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------------


def _default_is_primary() -> bool:
    import jax

    return jax.process_index() == 0


class MetricsWriter:
    """Fans each record out to the sinks. Only the primary process writes; elsewhere every call is a no-op.

    Args:
      run_dir: the run directory (created if missing); metrics go to RUN_DIR/metrics.jsonl and TensorBoard
        events to RUN_DIR/tensorboard/.
      tensorboard: write TensorBoard scalars (numeric values only).
      wandb: None/False to disable, or a dict of `wandb.init` keyword arguments (project, entity, name,
        config, ...). Used only when the `wandb` package is installed; the run id is kept in
        RUN_DIR/wandb_run_id.txt so a resumed run continues the same W&B run.
      console: show a tqdm progress bar (total_steps as its length).
      is_primary: whether this process writes; defaults to jax.process_index() == 0.
      resume_step: when resuming from a checkpoint at this step, records with a larger step are dropped
        from the JSONL first and TensorBoard is told to purge them, so the history equals that of an
        uninterrupted run. `-1` starts the history afresh; None appends to whatever is there.
      total_steps: length of the progress bar.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        wandb: Mapping[str, Any] | None | bool = None,
        console: bool = True,
        is_primary: bool | None = None,
        resume_step: int | None = None,
        total_steps: int | None = None,
    ):
        self.run_dir = Path(run_dir)
        if str(run_dir).startswith(("gs://", "s3://")):
            raise ValueError(f"metrics need a POSIX run directory (mount the bucket, e.g. gcsfuse), got {run_dir}")
        self.is_primary = _default_is_primary() if is_primary is None else bool(is_primary)
        self._file = None
        self._tb = None
        self._wandb_run = None
        self._bar: ProgressBar | None = None
        self._closed = False
        if not self.is_primary:
            return

        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        if resume_step is not None:
            truncate_after(self.run_dir, resume_step)
        # elapsed_s continues from the last kept record, so hours-to-threshold count only run time.
        self._elapsed_offset = 0.0
        if path.is_file():
            previous = read_metrics(self.run_dir)
            elapsed = [r["elapsed_s"] for r in previous if _is_scalar_number(r.get("elapsed_s"))]
            if elapsed:
                self._elapsed_offset = float(elapsed[-1])
            if previous and resume_step is None:
                # A torn last line must not glue onto the next record.
                truncate_after(self.run_dir, max(r["step"] for r in previous))
        self._start = time.monotonic()
        self._file = open(path, "a", encoding="utf-8")

        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=purge, flush_secs=30)

        if wandb:
            self._wandb_run = self._init_wandb(dict(wandb) if isinstance(wandb, Mapping) else {})

        if console:
            initial = max(resume_step or 0, 0)
            self._bar = ProgressBar(total_steps, initial=initial)

    def _init_wandb(self, kwargs: dict[str, Any]):
        try:
            import wandb as wandb_lib
        except ImportError:
            warnings.warn("wandb logging requested but the wandb package is not installed; skipping it", stacklevel=3)
            return None
        id_file = self.run_dir / WANDB_ID_FILE
        if "id" not in kwargs:
            if id_file.is_file():
                kwargs["id"] = id_file.read_text().strip()
            else:
                kwargs["id"] = uuid.uuid4().hex[:16]
        id_file.write_text(kwargs["id"] + "\n")
        kwargs.setdefault("resume", "allow")
        kwargs.setdefault("dir", str(self.run_dir))
        return wandb_lib.init(**kwargs)

    def write(self, step: int, record: Mapping[str, Any]) -> dict[str, Any] | None:
        """Write one record for `step`; returns the record as written (None on non-primary processes).

        "time" and "elapsed_s" are filled in unless the record brings its own.
        """
        if self._closed:
            raise ValueError("MetricsWriter.write called after close()")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise ValueError(f"step must be an int, got {type(step).__name__}")
        if not self.is_primary:
            return None
        step = int(step)
        if "step" in record and record["step"] != step:
            raise ValueError(f"record has step {record['step']} but was written for step {step}")
        now = time.time()
        out: dict[str, Any] = {
            "step": step,
            "time": now,
            "elapsed_s": self._elapsed_offset + (time.monotonic() - self._start),
        }
        for key, value in record.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"metric keys must be non-empty strings, got {key!r}")
            if key == "step":
                continue
            out[key] = _to_python(key, value)

        self._file.write(json.dumps({k: _json_safe(v) for k, v in out.items()}, allow_nan=False) + "\n")
        self._file.flush()

        scalars = {k: float(v) for k, v in out.items() if k not in BOOKKEEPING_KEYS and _is_scalar_number(v)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(tensorboard_tag(key), value, global_step=step, walltime=out["time"])
            self._tb.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(scalars, step=step)
        if self._bar is not None:
            self._bar.update(step, out)
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
