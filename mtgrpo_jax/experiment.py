"""`mtgrpo experiment`: methods x seeds x grid points, each an ordinary `mtgrpo train` run, paired by seed.

The runner only schedules subprocesses and aggregates what they write, so an experiment runs the same way
on a laptop, a GPU host or a TPU VM: every run is the `mtgrpo train` command a user would type.

Paired by seed: for each seed, `mtgrpo sft` trains the supervised warm start once; every method and grid
point of that seed starts from that same checkpoint (its SHA-256 is recorded and checked before each run),
uses the same seed for its rollouts and evaluates on the same held-out prompts (they come from the
config, not from the method). Differences between methods of one seed are then differences of method,
not of starting point, which is what makes the paired difference in the report much tighter than the
spread across seeds.

Layout of DIR:
  experiment.json          the base config (resolved, without method, seed and output_dir) and the runs asked for
  warmstart/seed_<s>/      the seed's warm start (`hf_sft/`) and warm_start.json {"seed", "sha256"}
  runs/<label>/seed_<s>/   one training run; experiment_run.json is written once it finished
  logs/<name>.log          each subprocess's output
  report/, summary.json    the comparison (mtgrpo_jax.train.report.write_experiment_report)

Rerunning the same command skips finished runs and resumes interrupted ones from their checkpoints
(`mtgrpo train` resumes by itself). SIGTERM or Ctrl-C forwards SIGTERM to the running children, which
checkpoint and exit; a rerun then finishes only what is missing.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtgrpo_jax.config import ConfigError, apply_overrides, from_dict
from mtgrpo_jax.train.cli import METHODS_DIR, resolve_config
from mtgrpo_jax.train.report import DEFAULT_THRESHOLDS, parse_thresholds, write_experiment_report

# How a run is started: the `mtgrpo` command of this interpreter (tests swap in a stand-in).
DEFAULT_COMMAND = [sys.executable, "-m", "mtgrpo_jax.cli"]
MANIFEST = "experiment.json"
RUN_MARKER = "experiment_run.json"
WARM_START_MARKER = "warm_start.json"
# The runner owns these keys: a run's seed and directory, and the model it starts from.
RUNNER_KEYS = ("seed", "output_dir", "model.path", "model.init", "sft.steps")
# A grid over these would give the methods of one seed different warm starts (or none).
WARM_START_PREFIXES = ("sft.", "model.", "tasks", "data_dir", "rollout.prompt_style", "rollout.prompt_buckets")


class ExperimentError(ValueError):
    """A bad experiment request or directory; the message is one line."""


# ----------------------------------------------------------------------------------------------------
# What to run
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    method: str
    seed: int
    grid: tuple[tuple[str, str], ...] = ()  # ((dotted key, value as typed), ...)

    @property
    def label(self) -> str:
        """The method and grid point, e.g. `mt_grpo` or `mt_grpo+weighting.lam=0.1` (also the folder name)."""
        return "+".join([self.method, *(f"{k}={v}" for k, v in self.grid)])

    @property
    def name(self) -> str:
        return f"{self.label}/seed_{self.seed}"


def parse_seeds(text: str) -> list[int]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise ExperimentError(f"--seeds: no seeds given ({text!r}); e.g. --seeds 0,1,2")
    try:
        seeds = [int(s) for s in items]
    except ValueError:
        raise ExperimentError(f"--seeds: not a comma-separated list of integers: {text!r}") from None
    dupes = sorted({s for s in seeds if seeds.count(s) > 1})
    if dupes:
        raise ExperimentError(f"--seeds: seed {dupes[0]} given twice")
    return seeds


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise ExperimentError(f"--methods: no methods given ({text!r}); e.g. --methods grpo,dapo,mt_grpo")
    known = sorted(p.stem for p in METHODS_DIR.glob("*.yaml"))
    for m in methods:
        if m not in known:
            raise ExperimentError(f"--methods: unknown method {m!r} (known: {', '.join(known)})")
    dupes = sorted({m for m in methods if methods.count(m) > 1})
    if dupes:
        raise ExperimentError(f"--methods: method {dupes[0]!r} given twice")
    return methods


def _has_key(tree: Any, dotted: str) -> bool:
    node = tree
    for key in dotted.split("."):
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        elif isinstance(node, dict) and key in node:
            node = node[key]
        else:
            return False
    return True


def parse_grid(items: Sequence[str], base_tree: dict) -> list[tuple[str, list[str]]]:
    """`key=v1,v2,...` items -> [(key, [v1, v2, ...])]; the key must name an existing config field."""
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ExperimentError(f"--grid {item!r}: expected key=v1,v2,...")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            raise ExperimentError(f"--grid {key}: no values given")
        if not _has_key(base_tree, key):
            raise ExperimentError(f"--grid: config has no key {key!r}")
        if key in RUNNER_KEYS or key.startswith(WARM_START_PREFIXES):
            raise ExperimentError(
                f"--grid: {key!r} would break the shared warm start of a seed; run a separate experiment for it"
            )
        if any(key == k for k, _ in grid):
            raise ExperimentError(f"--grid: key {key!r} given twice")
        grid.append((key, vals))
    return grid


def grid_points(grid: list[tuple[str, list[str]]]) -> list[tuple[tuple[str, str], ...]]:
    if not grid:
        return [()]
    keys = [k for k, _ in grid]
    return [tuple(zip(keys, combo)) for combo in itertools.product(*(v for _, v in grid))]


# ----------------------------------------------------------------------------------------------------
# Checkpoint identity
# ----------------------------------------------------------------------------------------------------


def directory_sha256(path: str | os.PathLike) -> str:
    """SHA-256 over every file of a directory (relative names and contents, in sorted order)."""
    root = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if not files:
        raise ExperimentError(f"warm start {root}: no files to hash")
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def _first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """The dotted key of the first difference between two config trees, or None when equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            d = _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
            if d is not None:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_difference(x, y, f"{where}.{i}" if where else str(i))
            if d is not None:
                return d
        return None
    return None if a == b else (where or "<root>")


def _get(tree: Any, dotted: str) -> Any:
    node = tree
    for key in dotted.split("."):
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        elif isinstance(node, dict):
            node = node.get(key)
        else:
            return None
    return node


def _without_run_keys(tree: dict) -> dict:
    return {k: v for k, v in tree.items() if k not in ("seed", "output_dir", "method")}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # a marker is there whole or not at all


# ----------------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------------


@dataclass
class Job:
    kind: str  # "warm_start" or "train"
    name: str
    run_dir: Path
    argv: list[str]  # after the `mtgrpo` command prefix
    config: dict  # the resolved config this job must run (compared with what a directory already holds)
    seed: int
    spec: RunSpec | None = None
    needs: str | None = None  # the warm-start job name it waits for
    started: float = 0.0
    process: subprocess.Popen | None = field(default=None, repr=False)
    signalled: bool = False

    def reap(self) -> tuple[int, float] | None:
        """(exit code, CPU seconds) once the process has ended, else None. CPU time (user + system, from
        wait4) says what the run costs on an idle machine even when it ran on a busy one."""
        assert self.process is not None
        pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
        if pid == 0:
            return None
        rc = os.waitstatus_to_exitcode(status)
        self.process.returncode = rc  # reaped here: Popen must not wait for it again
        return rc, usage.ru_utime + usage.ru_stime


class Experiment:
    def __init__(
        self,
        config: str | os.PathLike,
        methods: Sequence[str],
        seeds: Sequence[int],
        out: str | os.PathLike,
        *,
        grid: Sequence[str] = (),
        overrides: Sequence[str] = (),
        parallel: int = 1,
        command: Sequence[str] | None = None,
        log=print,
    ):
        if parallel < 1:
            raise ExperimentError(f"--parallel: must be >= 1, got {parallel}")
        if not methods:
            raise ExperimentError("--methods: no methods given")
        if not seeds:
            raise ExperimentError("--seeds: no seeds given")
        self.config_path = Path(config).resolve()
        if not self.config_path.is_file():
            raise ExperimentError(f"--config: file not found: {config}")
        for o in overrides:
            key = o.partition("=")[0].strip()
            if key in RUNNER_KEYS:
                raise ExperimentError(f"override {o!r}: the experiment sets {key} itself")
        self.methods, self.seeds = list(methods), list(seeds)
        self.out = Path(out).absolute()
        self.overrides = list(overrides)
        self.parallel = parallel
        self.command = list(command if command is not None else DEFAULT_COMMAND)
        self.log = log
        self.base = self._resolve(None, [])  # also rejects bad overrides with the config's own one-line error
        self.grid = parse_grid(grid, self.base)
        self.uses_warm_start = self.base["sft"]["steps"] > 0
        self.specs = [
            RunSpec(m, s, point) for s in self.seeds for m in self.methods for point in grid_points(self.grid)
        ]
        self._stop = False

    # ---------------------------------------------------------------------------------------- configs
    def _resolve(self, method: str | None, extra: list[str]) -> dict:
        # The same resolution `mtgrpo train` does, so what the runner expects is what the run writes.
        args = argparse.Namespace(config=str(self.config_path), method=method, overrides=self.overrides + extra)
        return resolve_config(args).model_dump(mode="json")

    def warm_start_dir(self, seed: int) -> Path:
        return self.out / "warmstart" / f"seed_{seed}"

    def run_dir(self, spec: RunSpec) -> Path:
        return self.out / "runs" / spec.label / f"seed_{spec.seed}"

    def _warm_start_overrides(self, seed: int) -> list[str]:
        return [f"seed={seed}", f"output_dir={self.warm_start_dir(seed)}"]

    def _train_overrides(self, spec: RunSpec) -> list[str]:
        extra = [f"{k}={v}" for k, v in spec.grid] + [f"seed={spec.seed}", f"output_dir={self.run_dir(spec)}"]
        if self.uses_warm_start:
            extra += [f"model.path={self.warm_start_dir(spec.seed) / 'hf_sft'}", "model.init=pretrained", "sft.steps=0"]
        return extra

    def jobs(self) -> list[Job]:
        """Every job in the order it should start: per seed, its warm start, then its runs (seed-major, so a
        partly finished experiment holds complete, paired seeds)."""
        out: list[Job] = []
        for seed in self.seeds:
            ws_name = None
            if self.uses_warm_start:
                extra = self._warm_start_overrides(seed)
                ws_name = f"warmstart/seed_{seed}"
                out.append(
                    Job(
                        "warm_start",
                        ws_name,
                        self.warm_start_dir(seed),
                        ["sft", "--config", str(self.config_path), *self.overrides, *extra],
                        self._resolve(None, extra),
                        seed,
                    )
                )
            for spec in (s for s in self.specs if s.seed == seed):
                extra = self._train_overrides(spec)
                try:
                    resolved = self._resolve(spec.method, extra)
                except ConfigError as err:
                    raise ExperimentError(f"{spec.name}: {err}") from None
                out.append(
                    Job(
                        "train",
                        spec.name,
                        self.run_dir(spec),
                        ["train", "--config", str(self.config_path), "--method", spec.method, *self.overrides, *extra],
                        resolved,
                        seed,
                        spec=spec,
                        needs=ws_name,
                    )
                )
        return out

    # ---------------------------------------------------------------------------------------- state on disk
    def _check_manifest(self) -> None:
        """One experiment directory holds one base config: another config cannot be mixed into its runs."""
        path = self.out / MANIFEST
        base_tree = _without_run_keys(self.base)
        old = _read_json(path) if path.exists() else None
        if path.exists() and old is None:
            raise ExperimentError(f"{path}: not readable JSON; is {self.out} an experiment directory?")
        if old is not None:
            try:  # through the config type, so keys added to it since then compare at their defaults
                old_tree = _without_run_keys(from_dict(old.get("base_config") or {}).model_dump(mode="json"))
            except ConfigError as err:
                raise ExperimentError(f"{path}: its base config no longer validates ({err})") from None
            diff = _first_difference(old_tree, base_tree)
            if diff is not None:
                raise ExperimentError(
                    f"{self.out} holds an experiment of another config ({diff}: {_get(old_tree, diff)!r} "
                    f"there, {_get(base_tree, diff)!r} now); use another --out"
                )
        runs = dict((old or {}).get("runs", {}))
        for spec in self.specs:
            runs[spec.name] = {
                "label": spec.label,
                "method": spec.method,
                "seed": spec.seed,
                "grid": dict(spec.grid),
                "dir": str(self.run_dir(spec).relative_to(self.out)),
            }
        self.out.mkdir(parents=True, exist_ok=True)
        _write_json(
            path, {"config": str(self.config_path), "overrides": self.overrides, "base_config": base_tree, "runs": runs}
        )

    @staticmethod
    def _check_run_dir(job: Job) -> None:
        """A directory that already holds a run must hold a run of this job's config."""
        saved = job.run_dir / "config.yaml"
        if not saved.is_file():
            return
        try:
            old = yaml.safe_load(saved.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            raise ExperimentError(f"{saved}: not valid YAML") from None
        try:  # through the config type, so defaults added since it was written compare as equal
            old = from_dict(apply_overrides(old or {}, [])).model_dump(mode="json")
        except ConfigError as err:
            raise ExperimentError(f"run directory {job.run_dir} was made by another config ({err})") from None
        # A run records what it resolved at its start (the prompt style when model.kind is auto): a value
        # left unset here matches whatever the run resolved it to.
        now = copy.deepcopy(job.config)
        for section, key, unset in (
            ("model", "kind", "auto"),
            ("rollout", "prompt_style", None),
            ("rollout", "template", None),
        ):
            if now.get(section, {}).get(key) == unset and key in old.get(section, {}):
                now[section][key] = old[section][key]
        diff = _first_difference(old, now)
        if diff is not None:
            raise ExperimentError(
                f"run directory {job.run_dir} was made by another config ({diff}: {_get(old, diff)!r} there, "
                f"{_get(now, diff)!r} now)"
            )

    def _is_done(self, job: Job) -> bool:
        marker = job.run_dir / (WARM_START_MARKER if job.kind == "warm_start" else RUN_MARKER)
        return marker.is_file() and _read_json(marker) is not None

    def _finish(self, job: Job, wall_s: float, cpu_s: float, warm_hashes: dict[int, str]) -> None:
        if job.kind == "warm_start":
            sha = directory_sha256(job.run_dir / "hf_sft")
            _write_json(
                job.run_dir / WARM_START_MARKER, {"seed": job.seed, "sha256": sha, "wall_s": wall_s, "cpu_s": cpu_s}
            )
            warm_hashes[job.seed] = sha
            return
        spec = job.spec
        assert spec is not None
        _write_json(
            job.run_dir / RUN_MARKER,
            {
                "label": spec.label,
                "method": spec.method,
                "seed": spec.seed,
                "grid": dict(spec.grid),
                "warm_start": (
                    {"path": str(self.warm_start_dir(spec.seed) / "hf_sft"), "sha256": warm_hashes[spec.seed]}
                    if self.uses_warm_start
                    else None
                ),
                "command": ["mtgrpo", *job.argv],
                "wall_s": wall_s,
                "cpu_s": cpu_s,
            },
        )

    # ---------------------------------------------------------------------------------------- scheduling
    def _request_stop(self, signum, frame) -> None:  # noqa: ARG002
        if not self._stop:
            self.log(f"[experiment] signal {signum}: stopping; running jobs checkpoint and exit, rerun to resume")
        self._stop = True

    def _start(self, job: Job) -> None:
        log_path = self.out / "logs" / (job.name.replace("/", "__") + ".log")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        job.run_dir.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log_file:
            log_file.write(f"\n$ mtgrpo {' '.join(job.argv)}\n".encode())
            log_file.flush()
            # Its own session: a Ctrl-C at the terminal reaches the runner only, which asks the child to
            # checkpoint (SIGTERM) instead of killing it mid-step.
            job.process = subprocess.Popen(
                [*self.command, *job.argv],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        job.started = time.perf_counter()
        self.log(f"[experiment] start {job.name} (log: {log_path.relative_to(self.out)})")

    def run(self) -> dict[str, list[str]]:
        """Runs what is missing. Returns {"done": [...], "skipped": [...], "failed": [...], "stopped": [...]}."""
        jobs = self.jobs()
        for job in jobs:
            self._check_run_dir(job)
        self._check_manifest()
        result: dict[str, list[str]] = {"done": [], "skipped": [], "failed": [], "stopped": []}
        warm_hashes: dict[int, str] = {}
        done: set[str] = set()
        pending: list[Job] = []
        for job in jobs:
            if self._is_done(job):
                if job.kind == "warm_start":
                    warm_hashes[job.seed] = self._verified_warm_start(job)
                done.add(job.name)
                result["skipped"].append(job.name)
            else:
                pending.append(job)
        running: list[Job] = []
        failed: set[str] = set()
        handlers = {s: signal.signal(s, self._request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while (pending and not self._stop) or running:
                if self._stop:
                    for job in running:
                        if not job.signalled:
                            job.process.send_signal(signal.SIGTERM)
                            job.signalled = True
                for job in list(pending):
                    if self._stop or len(running) >= self.parallel:
                        break
                    if job.needs is not None and job.needs in failed:
                        pending.remove(job)
                        failed.add(job.name)
                        result["failed"].append(f"{job.name} (its warm start failed)")
                        continue
                    if job.needs is None or job.needs in done:
                        pending.remove(job)
                        self._start(job)
                        running.append(job)
                time.sleep(0.2)
                for job in list(running):
                    ended = job.reap()
                    if ended is None:
                        continue
                    rc, cpu = ended
                    running.remove(job)
                    wall = time.perf_counter() - job.started
                    if rc == 0:
                        self._finish(job, wall, cpu, warm_hashes)
                        done.add(job.name)
                        result["done"].append(job.name)
                        self.log(f"[experiment] done  {job.name} ({wall:.0f} s, {cpu:.0f} CPU s)")
                    elif rc == 143 or self._stop:
                        result["stopped"].append(job.name)
                        self.log(f"[experiment] stopped {job.name} (checkpointed; rerun to resume)")
                    else:
                        failed.add(job.name)
                        result["failed"].append(job.name)
                        self.log(f"[experiment] FAILED {job.name} (exit {rc}); see its log")
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        result["stopped"] += [j.name for j in pending if j.name not in failed]
        return result

    def _verified_warm_start(self, job: Job) -> str:
        recorded = _read_json(job.run_dir / WARM_START_MARKER) or {}
        sha = directory_sha256(job.run_dir / "hf_sft")
        if recorded.get("sha256") != sha:
            raise ExperimentError(
                f"warm start {job.run_dir / 'hf_sft'} changed since it was trained "
                f"(sha256 {sha[:12]}, recorded {str(recorded.get('sha256'))[:12]}); delete "
                f"{job.run_dir} to retrain it and the runs of seed {job.seed}"
            )
        return sha


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, prog: str = "mtgrpo experiment") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--config", "-c", required=True, help="the experiment's YAML config (no method in it needed)")
    parser.add_argument("--methods", required=True, help="comma-separated method presets, e.g. grpo,dapo,mt_grpo")
    parser.add_argument("--seeds", required=True, help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a config key and its values; repeat for a Cartesian product",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="the experiment directory")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (default 1)")
    parser.add_argument(
        "--baseline", default=None, help="the report's baseline label (default: dapo if run, else the first method)"
    )
    parser.add_argument(
        "--thresholds",
        default=None,
        help="worst-task accuracy thresholds of the report, comma-separated (default: 0.2,0.3,0.4,0.5)",
    )
    parser.add_argument(
        "--no-report", action="store_true", help="only run; `mtgrpo report DIR` writes the report later"
    )
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides for every run")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        thresholds = parse_thresholds(args.thresholds) if args.thresholds else DEFAULT_THRESHOLDS
    except argparse.ArgumentTypeError as err:
        print(f"{prog}: error: --thresholds: {err}", file=sys.stderr)
        return 2
    try:
        methods = parse_methods(args.methods)
        experiment = Experiment(
            args.config,
            methods,
            parse_seeds(args.seeds),
            args.out,
            grid=args.grid,
            overrides=args.overrides,
            parallel=args.parallel,
        )
        t0 = time.perf_counter()
        result = experiment.run()
    except (ExperimentError, ConfigError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    print(
        f"[experiment] {len(result['done'])} run(s) done, {len(result['skipped'])} already finished, "
        f"{len(result['failed'])} failed, {len(result['stopped'])} left to resume "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    if not args.no_report and not result["stopped"]:
        baseline = args.baseline or ("dapo" if "dapo" in methods else methods[0])
        try:
            written = write_experiment_report(experiment.out, baseline=baseline, thresholds=thresholds)
        except ValueError as err:
            print(f"{prog}: error: report: {err}", file=sys.stderr)
            return 1
        print(written["report_md"].read_text(encoding="utf-8"))
        print(f"report: {written['report_md'].parent}; summary: {experiment.out / 'summary.json'}")
    if result["failed"]:
        print(f"{prog}: failed: {', '.join(result['failed'])}", file=sys.stderr)
        return 1
    return 143 if result["stopped"] else 0


if __name__ == "__main__":
    sys.exit(main())
