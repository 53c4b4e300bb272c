"""`mtgrpo plan`: compile every program a training step runs, for a named TPU slice, ahead of time.

Nothing here reads weights or needs a TPU: the model is built with `nnx.eval_shape` (shapes and dtypes
only), its parameters get the shardings the trainer gives them on the config's mesh laid over the slice's
devices (libtpu describes them: `parallel.topology`), and each program is the trainer's own jitted
function (`make_update_fn`, `make_logprob_fn`, `make_objective_fn`, `make_sft_update_fn`, the rollout
`RolloutEngine`'s program) lowered with abstract arguments at the config's real shapes and compiled by libtpu.
The compiled program's `memory_analysis()` says what it needs per device and `cost_analysis()` its FLOPs
and bytes accessed per device.

How costs are counted. XLA's `cost_analysis()` counts a while loop's body once, whatever its trip
count, and the programs loop at three levels:
- the decoder layers (`Transformer.trunk`'s layer scan) and the chunked token logprobs (the
  position-block and vocabulary-slice scans of `rl.logprobs`) run through `mtgrpo_jax.loops.scan`. For
  each program that has them (rollout prefill, old/reference logprobs, policy update, improvement, SFT
  step) cost-only variants are compiled with the model at 1 and 2 layers (abstract, same shapes
  otherwise) under `loops.unrolled_scans()`, so those scans are open code that the cost analysis counts
  in full, and the cost is extrapolated to the real depth L: cost(L) = cost(1) + (L - 1) x (cost(2) -
  cost(1)); with more rows per chunk than twice the batch devices, the variants are compiled at 1 and 2
  rows per device and extrapolated over the rows as well (`Depths.cost`). Memory, peak and fit always
  come from the real, scanned program. If a variant fails to compile, the program keeps its
  as-compiled cost (each loop body once, about 1/L of the truth) and its `cost_counted` says so; so does
  `count_loops=False` (`mtgrpo plan --no-count-loops`), which skips the variants.
- the update's scan over mini-batches x micro-batches and the old/reference/improvement forwards' scan
  over row chunks stay loops: their cost is scaled by the trip count (`scale=chunks`), so the optimizer
  update, once per mini-batch, is counted once per micro-batch (a small over-count of elementwise work).
- the decode `while_loop`s are priced at `max_new_tokens - 1` steps (every row running to the limit: an
  upper bound), each step the loop body as compiled (the fast decode step runs its layers in Python,
  so the body is the whole step), reading the KV cache blocks written so far (the whole static cache
  when it is one block, the TPU default); see `rollout_programs`.
Each program's `flops`, `bytes_accessed` and `roofline_s` are per device for one call of it.
A Pallas kernel (splash attention on TPU) is a custom call whose FLOPs the cost analysis does not see
unless the kernel states them; the splash kernel does not, so when `model.attention` resolves to splash
its score and value matmuls are added to those programs' FLOPs by formula (`splash_attention_flops`).

Which programs: the rollout prefill (with everything before the decode loop) and the rollout program
(prefill + decode loop) for one chunk of a sampler round; the old-logprob forward when
`optim.recompute_old_logprobs`; the reference forward when `loss.beta > 0`; the policy update (all
mini-batches x micro-batches of a step); the improvement forward after the update when the task
weighting reads it (`weighting.improvement: step_mean`, or `improvement_diagnostics`; the `minibatch_sum` and `fresh`
estimators are computed inside the update);
the SFT step when `sft.steps > 0` (completions at `max_new_tokens`, an upper bound; not part of a step).
Each program's peak also counts what stays resident while it runs (the policy's parameters and
optimizer state, the reference parameters).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mtgrpo_jax import loops
from mtgrpo_jax.config import Config, ConfigError
from mtgrpo_jax.models import ModelConfig, Transformer, tiny_config
from mtgrpo_jax.parallel import BATCH_AXES, make_mesh, state_shardings
from mtgrpo_jax.parallel.topology import Topology, resolve_topology, topology_devices
from mtgrpo_jax.train import setup
from mtgrpo_jax.train.update import (
    Batch,
    UpdateSettings,
    make_logprob_fn,
    make_objective_fn,
    make_sft_update_fn,
    make_update_fn,
)


class PlanError(ValueError):
    """The plan cannot be made (bad topology, unknown model, mesh mismatch); the message is one line."""


# ---------------------------------------------------------------------------------------------------------------
# Model configs without a hub: the config.json values of the models the paper and its users train.

_QWEN25 = dict(
    architectures=["Qwen2ForCausalLM"],
    model_type="qwen2",
    hidden_act="silu",
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    bos_token_id=151643,
    eos_token_id=151643,
    use_sliding_window=False,
)
_QWEN3 = dict(
    architectures=["Qwen3ForCausalLM"],
    model_type="qwen3",
    hidden_act="silu",
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    bos_token_id=151643,
    eos_token_id=151645,
    head_dim=128,
    vocab_size=151936,
    attention_bias=False,
    max_position_embeddings=40960,
    use_sliding_window=False,
)
_LLAMA3 = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_act="silu",
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    bos_token_id=128000,
    vocab_size=128256,
    attention_bias=False,
    mlp_bias=False,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=False,
)
_LLAMA31_ROPE = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}

KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-0.5B": dict(
        _QWEN25,
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
    ),
    "Qwen/Qwen2.5-1.5B": dict(
        _QWEN25,
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
    ),
    "Qwen/Qwen2.5-3B": dict(
        _QWEN25,
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
    ),
    "Qwen/Qwen2.5-7B": dict(
        _QWEN25,
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        max_position_embeddings=131072,
    ),
    "Qwen/Qwen3-0.6B": dict(
        _QWEN3,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "Qwen/Qwen3-1.7B": dict(
        _QWEN3,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "Qwen/Qwen3-4B": dict(
        _QWEN3,
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "Qwen/Qwen3-8B": dict(
        _QWEN3,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
    "meta-llama/Meta-Llama-3-8B": dict(_LLAMA3, eos_token_id=128001, max_position_embeddings=8192),
    "meta-llama/Llama-3.1-8B": dict(
        _LLAMA3, eos_token_id=128001, max_position_embeddings=131072, rope_scaling=_LLAMA31_ROPE
    ),
}
# Instruct variants share the architecture; only the end-of-turn token differs.
for _name in ("0.5B", "1.5B", "3B", "7B"):
    KNOWN_MODELS[f"Qwen/Qwen2.5-{_name}-Instruct"] = dict(
        KNOWN_MODELS[f"Qwen/Qwen2.5-{_name}"], eos_token_id=151645, max_position_embeddings=32768
    )
KNOWN_MODELS["meta-llama/Meta-Llama-3-8B-Instruct"] = dict(
    KNOWN_MODELS["meta-llama/Meta-Llama-3-8B"], eos_token_id=[128001, 128009]
)
KNOWN_MODELS["meta-llama/Llama-3.1-8B-Instruct"] = dict(
    KNOWN_MODELS["meta-llama/Llama-3.1-8B"], eos_token_id=[128001, 128008, 128009]
)
KNOWN_MODELS["meta-llama/Meta-Llama-3.1-8B"] = KNOWN_MODELS["meta-llama/Llama-3.1-8B"]
KNOWN_MODELS["meta-llama/Meta-Llama-3.1-8B-Instruct"] = KNOWN_MODELS["meta-llama/Llama-3.1-8B-Instruct"]


def model_config(cfg: Config) -> ModelConfig:
    """The run's ModelConfig without reading weights: `config.json` of a local `model.path`, else the
    known-model table (a hub may be unreachable), else the bundled tiny config when `path` is None;
    `model.overrides` on top, as the trainer applies them."""
    path = cfg.model.path
    if path is None:
        base = tiny_config()
    elif Path(path).is_dir():
        try:
            base = ModelConfig.from_hf(path)
        except (FileNotFoundError, ValueError, KeyError) as err:
            raise PlanError(f"model.path: {err}") from None
    else:
        known = {k.lower(): v for k, v in KNOWN_MODELS.items()}
        if path.lower() not in known:
            raise PlanError(
                f"model.path: unknown model {path!r}: not a local directory with config.json and not one "
                f"of the known configs ({', '.join(sorted(k for k in KNOWN_MODELS if 'Instr' not in k))})"
            )
        base = ModelConfig.from_hf(known[path.lower()])
    if cfg.model.overrides:
        try:
            base = ModelConfig.from_hf({**base.to_hf_dict(), **cfg.model.overrides})
        except (TypeError, ValueError, KeyError) as err:
            raise PlanError(f"model.overrides: {err}") from None
    return base


def model_options(cfg: Config) -> dict:
    """Keyword arguments of `Transformer` that the config sets beyond the dtypes, as `setup.build_model`
    passes them. The plan is always for a TPU, so `model.attention: auto` is resolved to what it picks
    there (the splash kernel), not to what the host tracing the program (a CPU) would pick."""
    fields = type(cfg.model).model_fields
    out = {key: getattr(cfg.model, key) for key in ("remat", "attention") if key in fields}
    if out.get("attention") == "auto":
        out["attention"] = "splash"
    return out


def abstract_model(cfg: Config, mc: ModelConfig) -> Transformer:
    """The run's Transformer with abstract (ShapeDtypeStruct) parameters: built as the trainer builds it."""
    dtype = jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32
    options = model_options(cfg)
    return nnx.eval_shape(lambda: Transformer(mc, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype, **options))


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def sharded_abstract_state(state: nnx.State, mesh, layout: str) -> nnx.State:
    return _abstract(state, state_shardings(state, mesh, layout))


def abstract_opt_state(tx: optax.GradientTransformation, params, mesh):
    """The optimizer state's shapes with the shardings `update.init_opt_state` gives them."""
    replicated = NamedSharding(mesh, P())
    shapes = jax.eval_shape(tx.init, params)
    shardings = optax.tree_map_params(
        tx,
        lambda _, s: s,
        shapes,
        jax.tree.map(lambda x: x.sharding, params),
        transform_non_params=lambda _: replicated,
    )
    return _abstract(shapes, shardings)


# ---------------------------------------------------------------------------------------------------------------
# Compiling and measuring one program


@dataclasses.dataclass
class ProgramPlan:
    name: str
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    peak_bytes: int
    flops: float
    bytes_accessed: float
    roofline_s: float
    fits: bool
    compile_s: float
    calls_per_step: float  # how often one training step runs it (0: not part of a step, e.g. SFT)
    knob: str = ""  # what to change when it does not fit
    cost_counted: str = ""  # how `flops` and `bytes_accessed` were counted (see the module docstring)
    cost_compile_s: float = 0.0  # compile time of the cost-only variants (1 and 2 layers, loops unrolled)

    def as_json(self) -> dict:
        keys = (
            "argument_bytes",
            "output_bytes",
            "temp_bytes",
            "peak_bytes",
            "flops",
            "bytes_accessed",
            "roofline_s",
            "fits",
            "compile_s",
            "calls_per_step",
            "cost_counted",
            "cost_compile_s",
        )
        return {k: getattr(self, k) for k in keys}


@dataclasses.dataclass
class _Compiled:
    memory: Any
    flops: float
    bytes_accessed: float
    compile_s: float


def compile_program(fn, *args, mesh=None, compiler_options: dict | None = None, **kwargs) -> _Compiled:
    """Lowers and compiles a jitted `fn` at abstract `args` (under `mesh` when the caller runs it so)."""
    start = time.perf_counter()
    if mesh is not None:
        with jax.set_mesh(mesh):
            compiled = fn.lower(*args, **kwargs).compile(compiler_options)
    else:
        compiled = fn.lower(*args, **kwargs).compile(compiler_options)
    elapsed = time.perf_counter() - start
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
        cost = cost[0] if cost else {}
    return _Compiled(
        compiled.memory_analysis(), float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)), elapsed
    )


def peak_bytes(memory) -> int:
    """What the program holds at once per device: arguments + outputs (less what is donated into them)
    + temporaries + the program itself."""
    return int(
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
        + memory.generated_code_size_in_bytes
    )


def device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return int(total)


def _report(
    name: str,
    c: _Compiled,
    topo: Topology,
    *,
    calls: float,
    scale: float = 1.0,
    flops: float | None = None,
    bytes_accessed: float | None = None,
    knob: str = "",
    resident: int = 0,
    cost: Cost | None = None,
    extra_flops: float = 0.0,
    extra_how: str = "",
) -> ProgramPlan:
    """`resident`: bytes per device that stay allocated while the program runs without being among its
    arguments (the optimizer state during rollout, ...); they count against HBM like its own. `cost`: the
    program's FLOPs and bytes with every layer and logprob-chunk trip counted (`Depths.cost`), used in
    place of the compiled program's own when it has them; `scale` multiplies either. `extra_flops`: work
    the cost analysis cannot see (a Pallas kernel's), added per call after scaling."""
    how = "as compiled"
    if cost is not None:
        how = cost.how
        if cost.flops is not None:
            flops, bytes_accessed = cost.flops, cost.bytes_accessed
    m = c.memory
    peak = peak_bytes(m) + resident
    f = (c.flops if flops is None else flops) * scale + extra_flops
    how += extra_how if extra_flops else ""
    b = (c.bytes_accessed if bytes_accessed is None else bytes_accessed) * scale
    roofline = max(f / topo.chip.peak_flops, b / topo.chip.hbm_bandwidth)
    return ProgramPlan(
        name,
        int(m.argument_size_in_bytes),
        int(m.output_size_in_bytes),
        int(m.temp_size_in_bytes),
        peak,
        f,
        b,
        roofline,
        peak <= topo.chip.hbm_bytes,
        c.compile_s,
        calls,
        knob,
        how,
        cost.compile_s if cost is not None else 0.0,
    )


def _is_oom(err: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(err) or "Ran out of memory" in str(err)


def _oom_bytes(err: Exception) -> int:
    """The requirement a RESOURCE_EXHAUSTED compile error states ("... required ... (245.7G) exceeds ...")."""
    import re

    m = re.search(r"\((\d+(?:\.\d+)?)([KMGT])\) exceeds", str(err))
    if not m:
        return 0
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2)))


class _RefusedMemory(NamedTuple):
    """The memory of a program the compiler refused: what its error says the temporaries needed."""

    temp_size_in_bytes: int
    argument_size_in_bytes: int = 0
    output_size_in_bytes: int = 0
    alias_size_in_bytes: int = 0
    generated_code_size_in_bytes: int = 0


def _try_compile(fn, *args, mesh=None, **kwargs):
    start = time.perf_counter()
    try:
        return compile_program(fn, *args, mesh=mesh, **kwargs)
    except Exception as err:  # noqa: BLE001 - only out-of-memory is a plan result; the rest propagate
        if not _is_oom(err):
            raise
        return _Compiled(_RefusedMemory(_oom_bytes(err)), 0.0, 0.0, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------------------
# Counting every loop trip: the model at 1 and 2 layers, its scans unrolled


@dataclasses.dataclass
class Cost:
    """A program's FLOPs and bytes per device at the model's depth (None: not counted, `how` says why)."""

    flops: float | None
    bytes_accessed: float | None
    how: str
    compile_s: float = 0.0
    per_layer: tuple[float, float] | None = None  # (FLOPs, bytes) one more layer adds: cost(2) - cost(1)


@dataclasses.dataclass
class Depth:
    """The run's model at some number of decoder layers, abstract and sharded as the trainer shards it."""

    model: Transformer
    graphdef: Any
    params: Any
    opt_state: Any


def splash_attention_flops(mc: ModelConfig, rows: int, length: int, passes: float) -> float:
    """FLOPs of the splash kernel's matmuls for `rows` sequences of `length` tokens through every layer, all
    devices together (XLA's cost analysis sees a Pallas kernel as a custom call without FLOPs). Causal:
    length x (length + 1) / 2 query-key pairs per row and query head, two matmuls over head_dim (scores,
    then values) of 2 FLOPs per multiply-add. `passes`: forward passes' worth of this work (a forward 1;
    its backward 2 more, for dQ, dK, dV and dP; a rematerialised forward 1 more)."""
    pairs = length * (length + 1) / 2
    return passes * 4.0 * pairs * mc.num_attention_heads * mc.head_dim * rows * mc.num_hidden_layers


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}"


class Depths:
    """The model at its real depth and, for cost counting, at 1 and 2 layers.

    A program is given as `build(depth) -> (jitted fn, args, kwargs)`; `cost(build)` compiles it at 1 and
    2 layers with `loops.unrolled_scans()` (so the layer scan and the chunked logprob scans are open code
    that XLA's cost analysis counts in full) and extrapolates linearly to the real depth:
    cost(L) = cost(1) + (L - 1) x (cost(2) - cost(1)). Every layer is the same block at the same
    shapes, so the line is exact up to XLA's per-program fusion choices. Those variants are cheap to
    compile (one or two layers); only their cost is read, never their memory.

    On TPU they compile with libtpu's memory-bound loop optimizer off: it places buffers in on-chip memory
    (no effect on FLOPs or HBM bytes counted) and libtpu 0.0.42.1 aborted the whole process with a CHECK
    failure in it (`memory_bound_loop_optimizer.cc:198`) on exp3's unrolled update, which no `except` can
    catch."""

    TPU_COST_OPTIONS = {"xla_tpu_memory_bound_loop_optimizer_options": "enabled:false"}

    def __init__(self, cfg: Config, mc: ModelConfig, mesh, tx, real: Depth | None = None, enabled: bool = True):
        """`real`: the model at its own depth when the caller has built it already (else built on demand).
        `enabled=False`: `cost` compiles nothing and leaves the program's cost as compiled."""
        self.cfg, self.mc, self.mesh, self.tx, self.enabled = cfg, mc, mesh, tx, enabled
        self._at = {} if real is None else {mc.num_hidden_layers: real}

    def at(self, layers: int) -> Depth:
        if layers not in self._at:
            model = abstract_model(self.cfg, dataclasses.replace(self.mc, num_hidden_layers=layers))
            graphdef, params, _ = nnx.split(model, nnx.Param, ...)
            params = sharded_abstract_state(params, self.mesh, "train")
            self._at[layers] = Depth(model, graphdef, params, abstract_opt_state(self.tx, params, self.mesh))
        return self._at[layers]

    @property
    def real(self) -> Depth:
        return self.at(self.mc.num_hidden_layers)

    def cost(self, build: Callable[..., tuple], rows: int | None = None, min_rows: int = 1) -> Cost:
        """`build(depth)`, or with `rows` `build(depth, r)`: the program at r rows per chunk (its batch
        scanned in chunks of r rows). With `rows` above `2 * min_rows` (`min_rows`: the mesh's batch
        devices) the variants are compiled at `min_rows` and `2 * min_rows` rows too, and the cost,
        linear in the rows at any depth (a row adds the same work; the optimizer's adds none), is
        extrapolated along both: 4 small compiles. At the paper's sizes the unrolled logprob chunks of
        a full micro-batch ask XLA for more HBM than the chip has (exp3's update: 163 GB), and a compile
        that does not fit returns no cost at all."""
        if not self.enabled:
            return Cost(None, None, "as compiled, loop bodies once (--no-count-loops: the cost variants were skipped)")
        layers = self.mc.num_hidden_layers
        depths = (1, 2) if layers > 1 else (1,)
        scaled = rows is not None and rows > 2 * min_rows
        widths = (min_rows, 2 * min_rows) if scaled else (rows,)
        start = time.perf_counter()
        try:
            tpu = self.mesh.devices.flat[0].platform == "tpu"
            options = self.TPU_COST_OPTIONS if tpu else None
            counted = {}
            with loops.unrolled_scans():
                for r in widths:
                    for n in depths:
                        fn, args, kwargs = build(self.at(n)) if r is None else build(self.at(n), r)
                        c = compile_program(fn, *args, mesh=self.mesh, compiler_options=options, **kwargs)
                        counted[n, r] = np.array([c.flops, c.bytes_accessed])
        except Exception as err:  # noqa: BLE001 - the plan falls back to the scanned cost and says why
            return Cost(
                None,
                None,
                f"as compiled, loop bodies once (the unrolled cost variant failed: {_one_line(err)})",
                time.perf_counter() - start,
            )
        elapsed = time.perf_counter() - start

        def at_depth(r) -> tuple[np.ndarray, np.ndarray]:  # (cost at the real depth, one layer's) at r rows
            if layers == 1:
                return counted[1, r], counted[1, r]
            per_layer = counted[2, r] - counted[1, r]
            return counted[1, r] + (layers - 1) * per_layer, per_layer

        how = "unrolled at 1 layer" if layers == 1 else f"unrolled at 1 and 2 layers, extrapolated to {layers}"
        total, per_layer = at_depth(widths[0])
        if scaled:
            (t2, l2), r1 = at_depth(widths[1]), widths[0]
            total = total + (rows - r1) / r1 * (t2 - total)
            per_layer = per_layer + (rows - r1) / r1 * (l2 - per_layer)
            how += f", at {r1} and {2 * r1} rows, extrapolated to {rows}"
        return Cost(
            float(total[0]),
            float(total[1]),
            how,
            elapsed,
            None if layers == 1 else (float(per_layer[0]), float(per_layer[1])),
        )


# ---------------------------------------------------------------------------------------------------------------
# The step's geometry


def update_chunk_program(d: Depth, tx, settings: UpdateSettings, rows: int, prompt_len: int, sharding, constrain):
    """The policy update's cost unit: the update program of one mini-batch of one micro-batch of `rows` rows.

    The step's update (`make_update_fn`) runs `mini_batches x micro_batches` micro-batch forward/backward
    passes, and, per mini-batch, what the improvement estimator adds (`minibatch_sum`: one more forward of
    the whole mini-batch) and one optimizer update. All of it but the optimizer updates is linear in the
    rows, so `chunks` times this program's cost is the step's, with the optimizer counted `chunks` times
    instead of `mini_batches` times (a fraction of a percent at the paper's sizes). Counting the step's own
    program instead, whose mini- and micro-batch loops stay loops, would count its per-mini-batch forward
    once per micro-batch: 4x the hand count for exp1's minibatch_sum update."""
    one = settings._replace(mini_batches=1, micro_batches=1)
    batch = abstract_batch(rows, prompt_len, settings.completion_len, sharding)
    return make_update_fn(d.graphdef, tx, one, constrain), (d.params, d.opt_state, batch), {}


def update_settings(cfg: Config, micro_batches: int) -> UpdateSettings:
    """The trainer's UpdateSettings for `cfg` (one place, so plan and trainer compile the same program)."""
    return UpdateSettings(
        mini_batches=cfg.optim.mini_batches,
        micro_batches=micro_batches,
        completion_len=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature,
        eps_low=cfg.loss.eps_low,
        eps_high=cfg.loss.eps_high,
        dual_clip=cfg.loss.dual_clip,
        aggregation=cfg.loss.aggregation,
        beta=cfg.loss.beta,
        kl_estimator=cfg.loss.kl_estimator,
        entropy_coef=cfg.loss.entropy_coef,
        num_tasks=max(1, len(cfg.tasks)),
        improvement=setup.improvement_mode(cfg),
        logprob_chunk=cfg.loss.logprob_chunk,
        vocab_chunk=cfg.loss.vocab_chunk,
        improvement_diagnostics=cfg.weighting.improvement_diagnostics and setup.improvement_mode(cfg) != "none",
    )


def prompts_per_round(cfg: Config) -> int:
    """Prompts one sampler round asks the rollout for: round(M_os x B) for the oversampling samplers, B
    for the plain one."""
    s = cfg.sampler
    if s.kind == "plain":
        return s.batch_size
    return max(1, int(round(s.oversample * s.batch_size)))


def abstract_batch(rows: int, prompt_len: int, completion_len: int, sharding) -> Batch:
    total = prompt_len + completion_len
    sd = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
    return Batch(
        input_ids=sd((rows, total), jnp.int32),
        attention_mask=sd((rows, total), jnp.bool_),
        completion_mask=sd((rows, completion_len), jnp.bool_),
        old_logp=sd((rows, completion_len), jnp.float32),
        advantages=sd((rows,), jnp.float32),
        task_ids=sd((rows,), jnp.int32),
        ref_logp=sd((rows, completion_len), jnp.float32),
    )


def batch_devices(mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def valid_micro_batches(cfg: Config, mesh) -> list[int]:
    """Micro-batch counts that split each mini-batch into equal micro-batches whose rows divide over
    the mesh's batch devices, fewest (largest micro-batches) first."""
    rows = cfg.sampler.batch_size * cfg.sampler.group_size
    per_mini = rows // cfg.optim.mini_batches
    devices = batch_devices(mesh)
    return [c for c in range(1, per_mini + 1) if per_mini % c == 0 and (per_mini // c) % devices == 0]


# ---------------------------------------------------------------------------------------------------------------
# The programs


@dataclasses.dataclass
class Plan:
    topology: Topology
    devices: int
    programs: dict[str, ProgramPlan]
    step_time_estimate_s: float
    rollout_share: float
    micro_batches: int

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.programs.values())

    def as_json(self) -> dict:
        return {
            "topology": self.topology.libtpu_name,
            "devices": self.devices,
            "hbm_bytes_per_device": self.topology.chip.hbm_bytes,
            "fits": self.fits,
            "step_time_estimate_s": self.step_time_estimate_s,
            "programs": {name: p.as_json() for name, p in self.programs.items()},
        }


def _knob(cfg: Config, program: str, mesh, micro_batches: int) -> str:
    """The one config change most likely to make `program` fit, given what is already switched on."""
    if program.startswith("rollout"):
        budget = cfg.rollout.kv_cache_budget_gib
        if budget is not None:
            return f"lower rollout.kv_cache_budget_gib (now {budget})"
        largest = max(cfg.rollout.batch_buckets)
        return f"set rollout.kv_cache_budget_gib, or lower the largest rollout.batch_buckets (now {largest})"
    if not cfg.loss.logprob_chunk:
        return "set loss.logprob_chunk (e.g. 512)"
    if cfg.model.remat == "none":
        return "set model.remat=block"
    if program == "sft_step":
        return f"lower sft.batch_size (now {cfg.sft.batch_size})"
    counts = valid_micro_batches(cfg, mesh)
    more = [c for c in counts if c > micro_batches]
    if more:
        return f"raise optim.micro_batches (now {micro_batches}; next valid {more[0]})"
    return "raise mesh.tensor or use a larger slice (one row per device already)"


PROGRAMS = (
    "rollout_prefill",
    "rollout_decode",
    "old_logprobs",
    "reference_logprobs",
    "policy_update",
    "improvement",
    "sft_step",
)


def plan(
    cfg: Config,
    topology: str | Topology,
    *,
    rollout_rounds: int = 1,
    only: set[str] | None = None,
    progress: Callable[[str], None] | None = None,
    count_loops: bool = True,
) -> Plan:
    """Compiles the step's programs for `topology` at `cfg`'s shapes and returns their costs (`only`: just
    these programs, by name; the step estimate then covers only them). `count_loops`: also compile each
    layered program's 1- and 2-layer unrolled variants (`Depths`) so its FLOPs and bytes count every layer
    and logprob chunk; without it a layered program's cost counts its loop bodies once."""
    say = progress or (lambda _: None)
    bad = sorted(set(only or ()) - set(PROGRAMS))
    if bad:
        raise PlanError(f"--only: unknown program {bad[0]!r} (programs: {', '.join(PROGRAMS)})")
    wanted = lambda name: only is None or name in only  # noqa: E731
    topo = topology if isinstance(topology, Topology) else resolve_topology(topology)
    devices = topology_devices(topo)
    m = cfg.mesh
    try:
        mesh = make_mesh(data=m.data, fsdp=m.fsdp, tensor=m.tensor, devices=devices)
    except ValueError as err:
        raise PlanError(f"{err} of the slice {topo.name} ({topo.libtpu_name})") from None
    setup.check_mesh(cfg, mesh)
    mc = model_config(cfg)
    model = abstract_model(cfg, mc)
    graphdef, params, _rest = nnx.split(model, nnx.Param, ...)
    params = sharded_abstract_state(params, mesh, "train")
    tx = setup.build_policy_optimizer(cfg)
    opt_state = abstract_opt_state(tx, params, mesh)
    depths = Depths(cfg, mc, mesh, tx, Depth(model, graphdef, params, opt_state), enabled=count_loops)
    rows = cfg.sampler.batch_size * cfg.sampler.group_size
    prompt_len, completion_len = max(cfg.rollout.prompt_buckets), cfg.rollout.max_new_tokens
    batch_sh = NamedSharding(mesh, P(BATCH_AXES))
    micro = resolve_micro_batches(
        cfg, mesh, graphdef, params, tx, opt_state=opt_state, hbm_bytes=topo.chip.hbm_bytes, progress=say
    )
    settings = update_settings(cfg, micro)
    chunks = cfg.optim.mini_batches * micro
    programs: dict[str, ProgramPlan] = {}
    # What stays in HBM for the whole run besides each program's own arguments: the policy's parameters
    # and optimizer state (train layout) and, with a KL term, the reference parameters.
    p_bytes, o_bytes = device_bytes(params), device_bytes(opt_state)
    ref_bytes = p_bytes if cfg.loss.beta > 0 else 0

    def add(name, compiled, **kw):
        p = _report(name, compiled, topo, **kw)
        if not p.fits:
            p.knob = _knob(cfg, name, mesh, micro)
        programs[name] = p
        say(
            f"{name}: peak {p.peak_bytes / 2**30:.2f} GiB / {topo.chip.hbm_bytes / 2**30:.2f} GiB, "
            f"compiled in {p.compile_s:.1f} s; cost {p.cost_counted}"
            + (f" ({p.cost_compile_s:.1f} s)" if p.cost_compile_s else "")
        )

    seq = prompt_len + completion_len
    forward_passes = 1
    training_passes = 3 + (cfg.model.remat != "none")  # forward, backward (2), the rematerialised forward

    def attention(n_rows: int, passes: float) -> dict:
        """The splash kernel's FLOPs per device, which the cost analysis does not see (`_report`'s extra)."""
        if model_options(cfg).get("attention") != "splash":
            return {}
        return dict(
            extra_flops=splash_attention_flops(mc, n_rows, seq, passes) / len(devices),
            extra_how=" + splash attention counted analytically",
        )

    def measure(
        build: Callable[[Depth, int], tuple], what: str, rows: int, cost_build: Callable | None = None
    ) -> tuple[_Compiled, Cost]:
        """The real program at `rows` rows per chunk (its memory) and its cost with every layer and logprob
        chunk counted. `cost_build`: the program whose cost is one chunk's, when `build`'s is not (the
        caller scales the cost by the chunks)."""
        say(f"compiling {what} ...")
        fn, args, kwargs = build(depths.real, rows)
        compiled = _try_compile(fn, *args, mesh=mesh, **kwargs)
        if depths.enabled:
            say(f"compiling {what} at 1 and 2 layers, loops unrolled, for its cost ...")
        return compiled, depths.cost(cost_build or build, rows, min_rows=batch_devices(mesh))

    def step_batch(r: int) -> Batch:  # the step's batch with r rows per chunk (rows // chunks in the real one)
        return abstract_batch(r * chunks, prompt_len, completion_len, batch_sh)

    # Rollout: the engine's program for one chunk of prompts, and its prefill alone (to split the cost).
    roll = {}
    if wanted("rollout_prefill") or wanted("rollout_decode"):
        roll = rollout_programs(
            cfg, model, mesh, topo, prompts_per_round(cfg), say, with_loop=wanted("rollout_decode"), depths=depths
        )
    for name, (compiled, kw) in roll.items():
        add(name, compiled, **{**kw, "calls": kw["calls"] * rollout_rounds}, resident=p_bytes + o_bytes + ref_bytes)

    constrain = lambda b: jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_sh), b)  # noqa: E731
    old_wanted = cfg.optim.recompute_old_logprobs and wanted("old_logprobs")
    if old_wanted or (cfg.loss.beta > 0 and wanted("reference_logprobs")):

        def logprob_program(d: Depth, r: int):
            fn = make_logprob_fn(
                d.graphdef,
                completion_len,
                cfg.rollout.temperature,
                chunks,
                seq_chunk=cfg.loss.logprob_chunk,
                vocab_chunk=cfg.loss.vocab_chunk,
            )
            b = step_batch(r)
            return fn, (d.params, b.input_ids, b.attention_mask), {}

        c, cost = measure(logprob_program, "the logprob forward", rows // chunks)
        if cfg.optim.recompute_old_logprobs and wanted("old_logprobs"):
            add(
                "old_logprobs",
                c,
                calls=1,
                scale=chunks,
                resident=o_bytes + ref_bytes,
                cost=cost,
                **attention(rows, forward_passes),
            )
        if cfg.loss.beta > 0 and wanted("reference_logprobs"):
            add(
                "reference_logprobs",
                c,
                calls=1,
                scale=chunks,
                resident=p_bytes + o_bytes,
                cost=cost,
                **attention(rows, forward_passes),
            )
    if wanted("policy_update"):

        def update_program(d: Depth, r: int):
            return make_update_fn(d.graphdef, tx, settings, constrain), (d.params, d.opt_state, step_batch(r)), {}

        c, cost = measure(
            update_program,
            "the policy update",
            rows // chunks,
            lambda d, r: update_chunk_program(d, tx, settings, r, prompt_len, batch_sh, constrain),
        )
        # The release's `minibatch_sum` estimator runs one more forward of every mini-batch inside the update.
        estimators = {settings.improvement} | ({"minibatch_sum"} if settings.improvement_diagnostics else set())
        passes = training_passes + ("minibatch_sum" in estimators)
        add("policy_update", c, calls=1, scale=chunks, resident=ref_bytes, cost=cost, **attention(rows, passes))
    if settings.improvement_forward and wanted("improvement"):

        def improvement_program(d: Depth, r: int):
            return make_objective_fn(d.graphdef, settings, chunks), (d.params, step_batch(r)), {}

        c, cost = measure(improvement_program, "the improvement forward", rows // chunks)
        add(
            "improvement",
            c,
            calls=1,
            scale=chunks,
            resident=o_bytes + ref_bytes,
            cost=cost,
            **attention(rows, forward_passes),
        )
    if cfg.sft.steps > 0 and wanted("sft_step"):
        sft_tx = optax.adamw(cfg.sft.learning_rate, b1=0.9, b2=0.99, weight_decay=cfg.sft.weight_decay)
        sft_rows = cfg.sft.batch_size
        total = prompt_len + completion_len
        sd = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=batch_sh)  # noqa: E731

        def sft_program(d: Depth, r: int):
            fn = make_sft_update_fn(
                d.graphdef, sft_tx, completion_len, seq_chunk=cfg.loss.logprob_chunk, vocab_chunk=cfg.loss.vocab_chunk
            )
            sft_batch = (sd((r, total), jnp.int32), sd((r, total), jnp.bool_), sd((r, completion_len), jnp.bool_))
            return fn, (d.params, abstract_opt_state(sft_tx, d.params, mesh), *sft_batch), {}

        c, cost = measure(sft_program, "the SFT step", sft_rows)
        add("sft_step", c, calls=0, resident=o_bytes + ref_bytes, cost=cost, **attention(sft_rows, training_passes))

    step = sum(p.roofline_s * p.calls_per_step for p in programs.values())
    rollout = sum(p.roofline_s * p.calls_per_step for n, p in programs.items() if n.startswith("rollout"))
    return Plan(topo, len(devices), programs, step, rollout / step if step else 0.0, micro)


def rollout_chunk_prompts(cfg: Config, prompts: int, engine, prompt_len: int) -> int:
    """Prompts per rollout program, as `RolloutEngine.generate` cuts a round: chunks of the largest batch bucket,
    or, with `rollout.kv_cache_budget_gib`, of the largest bucket whose KV cache fits the budget."""
    from mtgrpo_jax.rollout import rollout_chunk_rows

    n, m = cfg.sampler.group_size, cfg.rollout.max_new_tokens
    per_call = max(engine.buckets.batch_sizes)
    budget = cfg.rollout.kv_cache_budget_gib
    if budget is not None:
        try:
            per_call = (
                rollout_chunk_rows(
                    engine.config,
                    budget,
                    positions=prompt_len + m,
                    n=n,
                    dtype=engine.cache_dtype,
                    batch_sizes=engine.buckets.batch_sizes,
                    shards=engine._cache_shards(),
                )
                // n
            )
        except ValueError as err:
            raise PlanError(f"rollout.kv_cache_budget_gib: {err}") from None
    return min(per_call, prompts)


def rollout_programs(
    cfg: Config, model, mesh, topo: Topology, prompts: int, say, with_loop: bool = True, depths: Depths | None = None
) -> dict:
    """The rollout `RolloutEngine`'s program for one chunk of prompts (prefill + decode loop: its memory is the
    real peak) and what it does before the loop alone (the prefill, the prompts' k/v in the decode
    layout, the loop's weights). The prefill's cost is counted layer by layer through `depths` (when
    given). The decode loop's cost is the whole program's less the prefill's, both as compiled (their
    layer scans counted alike, once), which leaves each decode loop's body once: the fast decode step
    runs its layers in Python, so a body is one whole step. With the cache in blocks the program runs
    one loop per phase, each body reading the blocks written so far, and the phases split the steps
    about evenly, so the loop costs (the bodies' sum / phases) x `max_new_tokens - 1` steps."""
    from mtgrpo_jax.rollout.engine import Buckets, _is_shape
    from mtgrpo_jax.train.policy import build_engine

    r = cfg.rollout
    n, m = cfg.sampler.group_size, r.max_new_tokens
    p = max(r.prompt_buckets)
    engine = build_engine(model, None, r, mesh)
    per_chunk = rollout_chunk_prompts(cfg, prompts, engine, p)
    b = Buckets.pick(engine.buckets.batch_sizes, per_chunk)
    chunks = math.ceil(prompts / per_chunk)
    state = sharded_abstract_state(nnx.state(model), mesh, "serve")
    rep = NamedSharding(mesh, P())
    shapes, shardings = engine._cache_layout(b, n, p, m)
    cache = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s, engine.cache_dtype, sharding=sh), shapes, shardings, is_leaf=_is_shape
    )
    batch_sh = NamedSharding(mesh, P(engine._sharding(2, 0, b).spec[0], None))
    ids = jax.ShapeDtypeStruct((b, p), jnp.int32, sharding=batch_sh)
    mask = jax.ShapeDtypeStruct((b, p), jnp.bool_, sharding=batch_sh)
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep)
    scalar = lambda dt: jax.ShapeDtypeStruct((), dt, sharding=rep)  # noqa: E731
    stop = jax.ShapeDtypeStruct((model.config.vocab_size,), jnp.bool_, sharding=rep)
    greedy = r.temperature == 0.0

    say(f"compiling the rollout prefill ({b} prompts x {p} tokens) ...")
    graphdef = nnx.graphdef(model)
    dtype = engine.cache_dtype

    def prefill(graphdef, state, prompt_ids, prompt_mask):
        # What the engine's program does before its decode loop (`RolloutEngine._run`, steps 1 and 2).
        mdl = nnx.merge(graphdef, state)
        positions = jnp.maximum(jnp.cumsum(prompt_mask.astype(jnp.int32), axis=1) - 1, 0)
        cache = mdl.init_cache(prompt_ids.shape[0], prompt_ids.shape[1], dtype=dtype)
        if engine.decode_impl != "fast":
            logits, cache = mdl(
                prompt_ids, positions=positions, cache=cache, cache_index=jnp.int32(0), kv_mask=prompt_mask
            )
            return logits[:, -1], cache
        hidden, cache = mdl.trunk(
            prompt_ids, positions=positions, cache=cache, cache_index=jnp.int32(0), kv_mask=prompt_mask
        )
        last = mdl.logits(hidden[:, -1:])[:, 0]
        return last, mdl.decode_prefix(cache, prompt_mask, dtype), mdl.decode_weights()

    def prefill_program(d: Depth):
        return (
            jax.jit(functools.partial(prefill, nnx.graphdef(d.model))),
            (sharded_abstract_state(nnx.state(d.model), mesh, "serve"), ids, mask),
            {},
        )

    pre = _try_compile(jax.jit(functools.partial(prefill, graphdef)), state, ids, mask, mesh=mesh)
    pre_cost = None
    if depths is not None:
        if depths.enabled:
            say("compiling the rollout prefill at 1 and 2 layers, loops unrolled, for its cost ...")
        pre_cost = depths.cost(prefill_program)
    prefill_entry = ("rollout_prefill", (pre, dict(calls=chunks, cost=pre_cost)))
    if not with_loop:
        return dict([prefill_entry])
    say(f"compiling the rollout program ({b * n} rows, {m} new tokens) ...")
    full = _try_compile(
        engine._program,
        state,
        cache,
        ids,
        mask,
        key,
        scalar(jnp.int32),
        scalar(jnp.int32),
        scalar(jnp.float32),
        scalar(jnp.float32),
        stop,
        mesh=mesh,
        n=n,
        max_new_tokens=m,
        greedy=greedy,
        top_k=int(r.top_k),
        use_top_p=r.top_p < 1.0,
    )
    steps = max(m - 1, 0) / len(engine._phases(m))
    loop_flops = max(full.flops - pre.flops, 0.0) * steps
    loop_bytes = max(full.bytes_accessed - pre.bytes_accessed, 0.0) * steps
    how = f"(program - prefill, loop bodies once) x {max(m - 1, 0)} steps / {len(engine._phases(m))} phase(s)"
    return dict([prefill_entry, ("rollout_decode", (full, dict(calls=chunks, cost=Cost(loop_flops, loop_bytes, how))))])


# ---------------------------------------------------------------------------------------------------------------
# optim.micro_batches = "auto"


def _device_hbm(mesh) -> int | None:
    """Bytes a program may use on the mesh's devices: the TPU table for a libtpu topology, else the
    runtime's own limit (GPU, TPU host); None on CPU."""
    device = mesh.devices.flat[0]
    if device.platform == "cpu":
        return None
    try:
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"])
    except Exception:  # noqa: BLE001 - compile-only (topology) devices have no runtime stats
        pass
    kind = device.device_kind.lower()
    from mtgrpo_jax.parallel.topology import CHIPS

    for gen, name in (("v6e", "v6"), ("v5e", "v5 lite"), ("v5p", "v5"), ("v4", "v4")):
        if name in kind:
            return CHIPS[gen].hbm_bytes
    return None


CPU_LOGITS_BUDGET_BYTES = 1 << 30


def resolve_micro_batches(
    cfg: Config,
    mesh,
    graphdef,
    params,
    tx,
    *,
    opt_state=None,
    hbm_bytes: int | None = None,
    headroom: float = 0.9,
    progress: Callable[[str], None] | None = None,
) -> int:
    """`optim.micro_batches` as a number. An int is returned as is. For "auto":

    - on an accelerator (or a libtpu topology): the fewest micro-batches (largest micro-batch) whose
      compiled update program fits `headroom` of the device's HBM. The update's temporaries grow about
      linearly in the micro-batch's rows, so two compiles (the smallest and twice the smallest
      micro-batch) predict the largest that fits; that one is compiled to confirm, stepping down on a miss.
    - on CPU (host memory, no compiler limit): the fewest micro-batches whose float32 logits
      `[rows per device, prompt + completion, vocab]`, the dominant temporary, stay under 1 GiB.
    """
    value = cfg.optim.micro_batches
    if value != "auto":
        return int(value)
    counts = valid_micro_batches(cfg, mesh)
    if not counts:
        raise ConfigError(
            f"config error: optim.micro_batches: no micro-batch count divides a mini-batch of "
            f"{cfg.sampler.batch_size * cfg.sampler.group_size // cfg.optim.mini_batches} rows over "
            f"{batch_devices(mesh)} batch devices"
        )
    say = progress or (lambda _: None)
    rows = cfg.sampler.batch_size * cfg.sampler.group_size
    per_mini = rows // cfg.optim.mini_batches
    devices = batch_devices(mesh)
    seq = max(cfg.rollout.prompt_buckets) + cfg.rollout.max_new_tokens
    hbm = hbm_bytes if hbm_bytes is not None else _device_hbm(mesh)
    if hbm is None:
        vocab = int(params["embed"].shape[0])
        for c in counts:
            if (per_mini // c // devices) * seq * vocab * 4 <= CPU_LOGITS_BUDGET_BYTES:
                return c
        return counts[-1]
    if opt_state is None:
        opt_state = abstract_opt_state(tx, params, mesh)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
    batch_sh = NamedSharding(mesh, P(BATCH_AXES))
    batch = abstract_batch(rows, max(cfg.rollout.prompt_buckets), cfg.rollout.max_new_tokens, batch_sh)
    constrain = lambda b: jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_sh), b)  # noqa: E731
    limit = headroom * hbm

    def peak(c: int) -> int:
        say(f"micro_batches=auto: compiling the update with {c} micro-batches of {per_mini // c} rows ...")
        out = _try_compile(
            make_update_fn(graphdef, tx, update_settings(cfg, c), constrain), params, opt_state, batch, mesh=mesh
        )
        return peak_bytes(out.memory)

    return choose_micro_batches(counts, per_mini, limit, peak)


def choose_micro_batches(counts: list[int], per_mini: int, limit: float, peak: Callable[[int], int]) -> int:
    """The fewest micro-batches (from `counts`, fewest first) whose `peak(count)` is within `limit`.

    Compiling is slow, so it does not try them all: the peaks of the smallest micro-batch and of one twice
    its rows give a line (temporaries grow linearly in rows); the largest micro-batch the line admits is
    tried first, then smaller ones until one fits. When even the smallest does not fit it is returned
    (the plan then reports the program as not fitting)."""
    smallest = counts[-1]  # most micro-batches: the smallest micro-batch
    p1 = peak(smallest)
    if p1 > limit or len(counts) == 1:
        return smallest
    r1 = per_mini // smallest
    bigger = [c for c in counts if per_mini // c == 2 * r1]
    if not bigger:
        return smallest
    p2 = peak(bigger[0])
    slope = max((p2 - p1) / r1, 1.0)
    best_rows = r1 + (limit - p1) / slope
    known = {smallest: p1, bigger[0]: p2}
    for c in [c for c in counts if per_mini // c <= best_rows]:  # fewest micro-batches first
        if (known[c] if c in known else peak(c)) <= limit:
            return c
    return smallest
