"""`mtgrpo plan`: will this config fit, and how long will a step take, on a TPU slice (checked on a CPU)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from mtgrpo_jax.config import ConfigError
from mtgrpo_jax.train.cli import resolve_config


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def _table(result) -> str:
    hbm = result.topology.chip.hbm_bytes
    lines = [
        f"{result.topology.name} = {result.topology.libtpu_name}: {result.devices} chips, {_gib(hbm)} HBM each; "
        f"optim.micro_batches = {result.micro_batches}",
        f"{'program':<19} {'args':>10} {'temp':>10} {'peak':>10} {'of HBM':>7} {'TFLOP':>9} {'GB read':>9} "
        f"{'roofline':>10} {'calls':>6} {'compile':>8}",
    ]
    for name, p in result.programs.items():
        lines.append(
            f"{name:<19} {_gib(p.argument_bytes):>10} {_gib(p.temp_bytes):>10} {_gib(p.peak_bytes):>10} "
            f"{p.peak_bytes / hbm:>6.0%} {p.flops / 1e12:>9.2f} {p.bytes_accessed / 1e9:>9.1f} "
            f"{p.roofline_s:>9.3f}s {p.calls_per_step:>6g} {p.compile_s:>7.1f}s" + ("" if p.fits else "  DOES NOT FIT")
        )
    for name, p in result.programs.items():  # FLOPs and bytes that do not count every loop trip
        if p.cost_counted.startswith("as compiled"):
            lines.append(f"  {name}: cost {p.cost_counted}")
    lines.append(
        f"step estimate (roofline, per chip; rollout at max_new_tokens): {result.step_time_estimate_s:.1f} s, "
        f"rollout {result.rollout_share:.0%} of it"
    )
    return "\n".join(lines)


def main(argv: list[str], prog: str = "mtgrpo plan") -> int:
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Compile every program of a training step ahead of time for a TPU slice (needs libtpu, the `tpu` extra; "
            "no TPU and no weights): per-device memory against HBM, FLOPs, bytes, roofline time and a step estimate. "
            "Exits 1 when a program does not fit."
        ),
    )
    p.add_argument("--config", "-c", help="YAML preset; omitted: the defaults")
    p.add_argument("--method", help="merge a method preset over the config (a YAML path or a name in configs/methods)")
    p.add_argument(
        "--topology",
        "-t",
        required=True,
        help="TPU slice: a Cloud name (v5p-8, v6e-8, v5litepod-4, v4-32) or a libtpu name (v5p:2x2x1)",
    )
    p.add_argument(
        "--rollout-rounds",
        type=int,
        default=1,
        help="sampler rounds per step in the estimate (each a full round at max_new_tokens; default 1)",
    )
    p.add_argument("--only", help="compile only these programs (comma-separated names, e.g. policy_update)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument(
        "--count-loops",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="count every layer and logprob chunk in the FLOPs and bytes (compiles each layered program "
        "again at 1 and 2 layers, unrolled; default). --no-count-loops skips that: faster, and a "
        "loop body counts once",
    )
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. mesh.tensor=2")
    args = p.parse_args(argv)
    # The programs compile for the slice through libtpu; the host backend only traces, so it stays CPU.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from mtgrpo_jax.parallel.topology import TopologyError
    from mtgrpo_jax.train.plan import PlanError, plan

    try:
        cfg = resolve_config(args)
        say = lambda msg: print(f"[plan] {msg}", file=sys.stderr, flush=True)  # noqa: E731 - stdout stays the result
        result = plan(
            cfg,
            args.topology,
            rollout_rounds=args.rollout_rounds,
            progress=say,
            only=set(args.only.split(",")) if args.only else None,
            count_loops=args.count_loops,
        )
    except (ConfigError, TopologyError, PlanError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
    else:
        print(_table(result))
    if not result.fits:
        name, worst = next((n, q) for n, q in result.programs.items() if not q.fits)
        print(
            f"{prog}: {name} does not fit {result.topology.name}: peak {_gib(worst.peak_bytes)} per device > "
            f"{_gib(result.topology.chip.hbm_bytes)} HBM; {worst.knob}",
            file=sys.stderr,
        )
        return 1
    return 0
