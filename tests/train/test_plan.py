"""`mtgrpo plan`: the step's programs compiled ahead of time for a TPU slice (libtpu, no TPU), its one-line
errors, the known-model table and `optim.micro_batches: auto`."""

import json

import pytest
import yaml

from mtgrpo_jax.cli import main
from mtgrpo_jax.config import load_config
from mtgrpo_jax.models import ModelConfig
from mtgrpo_jax.train import plan as plan_mod
from mtgrpo_jax.train import setup
from mtgrpo_jax.train.update import make_optimizer

TINY = {
    "model": {"init": "random", "overrides": {"num_hidden_layers": 1, "vocab_size": 512}},
    "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
    "tasks": [{"name": "countdown", "family": "countdown", "train": {"level": 1, "n": 8}}],
    "sampler": {"kind": "ratio_preserving", "batch_size": 4, "group_size": 4, "oversample": 2.0},
    "rollout": {"max_new_tokens": 32, "prompt_buckets": [64], "batch_buckets": [4, 8]},
    "optim": {"mini_batches": 2, "micro_batches": 2},
    # step_mean: the paper's estimator, a forward after the update (the other two are inside the update).
    "weighting": {"kind": "mt_grpo", "improvement": "step_mean"},
}


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return str(path)


def _run(capsys, *argv):
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("mtgrpo plan:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.slow
def test_tiny_plan_compiles_rollout_update_and_improvement_for_v5e(tiny_config, capsys):
    pytest.importorskip("libtpu")
    code, out, err = _run(capsys, "--config", tiny_config, "--topology", "v5e:2x2", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == {"topology", "devices", "hbm_bytes_per_device", "fits", "step_time_estimate_s", "programs"}
    assert (result["topology"], result["devices"], result["fits"]) == ("v5e:2x2", 4, True)
    assert set(result["programs"]) == {"rollout_prefill", "rollout_decode", "policy_update", "improvement"}
    for name, p in result["programs"].items():
        assert p["fits"] and 0 < p["peak_bytes"] < result["hbm_bytes_per_device"], name
        assert p["peak_bytes"] >= p["argument_bytes"] and p["flops"] > 0 and p["roofline_s"] > 0, name
        # every layer and logprob chunk counted (a 1-layer model: its one variant, loops unrolled)
        assert p["cost_counted"].startswith("unrolled at 1 layer" if name != "rollout_decode" else "(program"), name
    # The update holds the parameters and the AdamW moments (bf16 params, so 3 x 2 bytes per parameter at
    # least), split over the 4 chips by FSDP.
    n_params = plan_mod.model_config(load_config(tiny_config)).num_params()
    assert result["programs"]["policy_update"]["argument_bytes"] >= 3 * 2 * n_params / 4 * 0.9
    total = sum(p["roofline_s"] * p["calls_per_step"] for p in result["programs"].values())
    assert result["step_time_estimate_s"] == pytest.approx(total)


def test_plan_that_cannot_fit_exits_1_naming_program_and_knob(tiny_config, capsys):
    pytest.importorskip("libtpu")
    # 4096 prompts of 4096 tokens in one prefill: [B, H, P, P] attention scores alone are about a terabyte.
    code, out, err = _run(
        capsys,
        "--config",
        tiny_config,
        "--topology",
        "v5e-4",
        "--only",
        "rollout_prefill",
        "sampler.batch_size=2048",
        "rollout.prompt_buckets=[4096]",
        "rollout.batch_buckets=[4096]",
    )
    assert code == 1, err
    line = _one_line(err)
    assert "rollout_prefill does not fit v5e-4" in line and "GiB per device > 15.75 GiB HBM" in line
    assert "rollout." in line.split(";")[-1]  # the knob


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--topology", "v5p-7"], "topology 'v5p-7'"),
        (["--topology", "v5e-4", "model.path=Qwen/Qwen9-1T"], "unknown model 'Qwen/Qwen9-1T'"),
        (["--topology", "v5e-4", "mesh.data=3"], "mesh data=3 x fsdp=-1 x tensor=1 does not divide the 4 available"),
        (
            ["--topology", "v5e-4", "mesh.data=8", "mesh.fsdp=1"],
            "8 devices does not match the 4 available devices of the slice v5e-4",
        ),
        (["--topology", "v5e-4", "--only", "everything"], "unknown program 'everything'"),
        (["--topology", "v5e-4", "rollout.batch_buckets=[2,4]"], "rollout.batch_buckets: [2] are not multiples"),
    ],
)
def test_bad_inputs_are_one_line_errors(tiny_config, capsys, argv, words):
    if "v5e-4" in argv:
        pytest.importorskip("libtpu")
    code, _, err = _run(capsys, "--config", tiny_config, *argv)
    assert code == 2
    assert words in _one_line(err)


@pytest.mark.parametrize(
    "name, billions",
    [
        ("Qwen/Qwen2.5-0.5B", 0.494),
        ("Qwen/Qwen2.5-1.5B", 1.544),
        ("Qwen/Qwen2.5-3B", 3.086),
        ("Qwen/Qwen2.5-7B", 7.616),
        ("Qwen/Qwen3-8B", 8.191),
        ("Qwen/Qwen3-4B", 4.022),
        ("meta-llama/Llama-3.1-8B", 8.030),
    ],
)
def test_known_models_have_their_published_sizes(name, billions):
    cfg = load_config(None, [f"model.path={name}"])
    assert plan_mod.model_config(cfg).num_params() / 1e9 == pytest.approx(billions, abs=0.002)


def test_local_model_dir_is_read_and_overrides_apply(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(plan_mod.KNOWN_MODELS["Qwen/Qwen2.5-3B"]))
    cfg = load_config(None, [f"model.path={tmp_path}", "model.overrides.num_hidden_layers=2"])
    mc = plan_mod.model_config(cfg)
    assert isinstance(mc, ModelConfig) and mc.hidden_size == 2048 and mc.num_hidden_layers == 2


def test_micro_batches_auto_on_cpu_keeps_logits_under_a_gib():
    import jax
    from flax import nnx

    from mtgrpo_jax.parallel import make_mesh

    cfg = load_config(
        None,
        [
            "optim.micro_batches=auto",
            "sampler.batch_size=8",
            "sampler.group_size=8",
            "optim.mini_batches=2",
            "rollout.max_new_tokens=1024",
            "rollout.prompt_buckets=[1024]",
            "model.overrides.vocab_size=65536",
        ],
    )
    mesh = make_mesh(fsdp=-1)
    model = plan_mod.abstract_model(cfg, plan_mod.model_config(cfg))
    graphdef, params, _ = nnx.split(model, nnx.Param, ...)
    count = plan_mod.resolve_micro_batches(cfg, mesh, graphdef, params, None)
    devices = len(jax.devices())
    per_mini = 64 // 2
    assert count in plan_mod.valid_micro_batches(cfg, mesh) and per_mini % count == 0
    logits = lambda c: (per_mini // c // devices) * 2048 * 65536 * 4  # noqa: E731
    assert logits(count) <= plan_mod.CPU_LOGITS_BUDGET_BYTES
    fewer = [c for c in plan_mod.valid_micro_batches(cfg, mesh) if c < count]
    assert all(logits(c) > plan_mod.CPU_LOGITS_BUDGET_BYTES for c in fewer)  # the fewest that fit
    assert (
        plan_mod.resolve_micro_batches(load_config(None, ["optim.micro_batches=2"]), mesh, graphdef, params, None) == 2
    )


@pytest.mark.parametrize("extra", [0.0, 0.3])
def test_micro_batch_search_finds_the_fewest_that_fit_in_few_compiles(extra):
    per_mini, devices = 576, 4
    counts = [c for c in range(1, per_mini + 1) if per_mini % c == 0 and (per_mini // c) % devices == 0]
    calls = []

    def true_peak(c):  # linear in the micro-batch's rows, plus (extra > 0) a super-linear term the line misses
        rows = per_mini // c
        return int(10e9 + 1.2e9 * rows + extra * 1e7 * rows**2)

    def peak(c):
        calls.append(c)
        return true_peak(c)

    limit = 90e9
    got = plan_mod.choose_micro_batches(counts, per_mini, limit, peak)
    best = next(c for c in counts if true_peak(c) <= limit)
    assert got == best
    assert len(set(calls) - {best}) <= 5  # a handful of compiles, not one per candidate
    calls.clear()
    assert plan_mod.choose_micro_batches(counts, per_mini, 1e9, peak) == counts[-1]  # nothing fits: the smallest


# ---------------------------------------------------------------------------------------------------------------
# Costs that count every loop trip: the layer scan and the chunked logprob scans, checked against a hand count.


def _cost_config(tmp_path, layers: int) -> str:
    """The tiny config at `layers` layers, its vocabulary large enough that the chunked LM head is a quarter of
    the work (so a head counted one chunk in 16 would show), XLA attention (whose score matmuls the cost
    analysis sees) and block remat."""
    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    cfg["model"].update(attention="xla", remat="block")
    cfg["model"]["overrides"] = {"num_hidden_layers": layers, "vocab_size": 16384}
    cfg["loss"] = {"logprob_chunk": 8, "vocab_chunk": 4096}  # 32 completion positions: 4 blocks x 4 slices
    path = tmp_path / f"cost{layers}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _hand_count(
    mc, tokens_per_row: int, rows: int, query_len: int, head_positions: int, passes: int, head_passes: int
) -> float:
    """FLOPs, all devices: 2 per multiply-add of the q/k/v/o and MLP projections at every query position,
    XLA attention's full [query_len, tokens] scores and their use on the values, in every layer, `passes`
    forward passes' worth (1 forward, 2 its backward, 1 the rematerialised forward); the LM head at
    `head_positions` per row, `head_passes` times."""
    h, d, i = mc.hidden_size, mc.head_dim, mc.intermediate_size
    nq, nkv = mc.num_attention_heads, mc.num_key_value_heads
    projections = h * nq * d * 2 + h * nkv * d * 2 + 3 * h * i
    layer = (2 * projections * query_len + 4 * query_len * tokens_per_row * nq * d) * rows * passes
    head = 2 * h * mc.vocab_size * head_positions * rows * head_passes
    return mc.num_hidden_layers * layer + head


@pytest.mark.slow
def test_update_cost_counts_every_layer_and_logprob_chunk(tmp_path):
    """The update's cost from the 1- and 2-layer unrolled variants, extrapolated to 3 layers, equals the
    3-layer program compiled fully unrolled, and its per-layer and LM-head parts agree with a hand count."""
    pytest.importorskip("libtpu")
    import dataclasses

    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from mtgrpo_jax import loops
    from mtgrpo_jax.parallel import BATCH_AXES, make_mesh
    from mtgrpo_jax.parallel.topology import topology_devices

    cfg = load_config(_cost_config(tmp_path, 3))
    mc = plan_mod.model_config(cfg)
    topo = plan_mod.resolve_topology("v5e:2x2")
    mesh = make_mesh(fsdp=-1, devices=topology_devices(topo))
    tx = make_optimizer(1e-6, b1=0.9, b2=0.99, weight_decay=0.01, grad_clip=1.0)
    rows, prompt, completion = 4 * 4, 64, 32  # sampler 4 prompts x 4 samples; prompt bucket; max_new_tokens
    batch_sh = NamedSharding(mesh, P(BATCH_AXES))
    settings = plan_mod.update_settings(cfg, 2)
    constrain = lambda b: jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_sh), b)  # noqa: E731

    def update_program(d):  # the plan's cost unit: one micro-batch of 4 rows (the step runs 2 x 2 of them)
        return plan_mod.update_chunk_program(d, tx, settings, rows // 4, prompt, batch_sh, constrain)

    depths = plan_mod.Depths(cfg, mc, mesh, tx)
    cost = depths.cost(update_program)
    assert cost.how == "unrolled at 1 and 2 layers, extrapolated to 3"
    with loops.unrolled_scans():
        fn, args, _ = update_program(depths.at(3))
        direct = plan_mod.compile_program(fn, *args, mesh=mesh)
    assert cost.flops == pytest.approx(direct.flops, rel=0.01)
    assert cost.bytes_accessed == pytest.approx(direct.bytes_accessed, rel=0.05)
    # One micro-batch of 4 rows, over the 4 devices. A layer: forward, backward (2) and the
    # block-rematerialised forward. What the hand count leaves out (norms, rope, softmax, silu) is about 1 %.
    one = dataclasses.replace(mc, num_hidden_layers=1)
    layer = (
        _hand_count(one, prompt + completion, rows // 4, prompt + completion, completion, passes=4, head_passes=0) / 4
    )
    assert 1.0 <= cost.per_layer[0] / layer <= 1.05
    # The rest is the LM head at the 32 completion positions, in 4 position blocks x 4 vocabulary slices: at
    # least its forward, its backward (2) and the checkpointed forward (4 passes; one chunk in 16 counted would
    # be 1/16 of that). The nested checkpoints (position blocks, then vocabulary slices) recompute it once or
    # twice more in the compiled update, hence the upper bound.
    head = (
        _hand_count(
            dataclasses.replace(mc, num_hidden_layers=0),
            prompt + completion,
            rows // 4,
            1,
            completion,
            passes=0,
            head_passes=4,
        )
        / 4
    )
    rest = cost.flops - 3 * cost.per_layer[0]
    print(f"update: per layer {cost.per_layer[0]:.4g} (hand {layer:.4g}), rest {rest:.4g} (head hand {head:.4g})")
    assert 1.0 <= rest / head <= 1.6


@pytest.mark.slow
def test_update_cost_extrapolates_over_rows(tmp_path):
    """At more rows per micro-batch than twice the batch devices, the cost variants compile at 1 and 2 rows
    per device (a full micro-batch's unrolled logprob chunks did not fit the chip at the paper's sizes) and
    extrapolate: the result equals the 3-layer program compiled fully unrolled at the real rows."""
    pytest.importorskip("libtpu")
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from mtgrpo_jax import loops
    from mtgrpo_jax.parallel import BATCH_AXES, make_mesh
    from mtgrpo_jax.parallel.topology import topology_devices

    cfg = load_config(_cost_config(tmp_path, 3))
    mc = plan_mod.model_config(cfg)
    mesh = make_mesh(fsdp=-1, devices=topology_devices(plan_mod.resolve_topology("v5e:2x2")))
    tx = make_optimizer(1e-6, b1=0.9, b2=0.99, weight_decay=0.01, grad_clip=1.0)
    batch_sh = NamedSharding(mesh, P(BATCH_AXES))
    settings = plan_mod.update_settings(cfg, 2)  # 2 mini-batches x 2 micro-batches: 4 chunks
    constrain = lambda b: jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_sh), b)  # noqa: E731

    def update_program(d, r):
        return plan_mod.update_chunk_program(d, tx, settings, r, 64, batch_sh, constrain)

    depths = plan_mod.Depths(cfg, mc, mesh, tx)
    cost = depths.cost(update_program, 12, min_rows=4)  # 3 rows per device
    assert cost.how == "unrolled at 1 and 2 layers, extrapolated to 3, at 4 and 8 rows, extrapolated to 12"
    with loops.unrolled_scans():
        fn, args, _ = update_program(depths.at(3), 12)
        direct = plan_mod.compile_program(fn, *args, mesh=mesh)
    assert cost.flops == pytest.approx(direct.flops, rel=0.01)
    # Bytes are near-linear in the rows: XLA fuses a little differently at each shape (5 % off here).
    assert cost.bytes_accessed == pytest.approx(direct.bytes_accessed, rel=0.1)
    # At no more than twice the devices' rows the variants are compiled at the real rows, as before.
    assert depths.cost(update_program, 8, min_rows=4).how == "unrolled at 1 and 2 layers, extrapolated to 3"


@pytest.mark.slow
@pytest.mark.parametrize("improvement", ["minibatch_sum", "step_mean"])
def test_plan_update_cost_equals_the_whole_update_with_every_loop_trip_counted(tmp_path, improvement):
    """`plan`'s policy_update FLOPs (one chunk's cost, scaled by the 2 x 2 chunks) equal the step's whole update
    compiled with every loop unrolled: the layers, the logprob chunks, the mini- and micro-batches, and, with
    the release's minibatch_sum estimator, its one extra forward per mini-batch (which a per-chunk count of
    the step's own program counts once per micro-batch)."""
    pytest.importorskip("libtpu")
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from mtgrpo_jax import loops
    from mtgrpo_jax.parallel import BATCH_AXES, make_mesh
    from mtgrpo_jax.parallel.topology import topology_devices
    from mtgrpo_jax.train.update import make_update_fn

    path = _cost_config(tmp_path, 3)
    raw = yaml.safe_load(open(path))
    raw["weighting"]["improvement"] = improvement
    path = tmp_path / "whole.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(str(path))
    p = plan_mod.plan(cfg, "v5e:2x2", only={"policy_update"}).programs["policy_update"]
    mesh = make_mesh(fsdp=-1, devices=topology_devices(plan_mod.resolve_topology("v5e:2x2")))
    settings = plan_mod.update_settings(cfg, 2)
    assert settings.improvement == improvement and (settings.mini_batches, settings.micro_batches) == (2, 2)
    batch_sh = NamedSharding(mesh, P(BATCH_AXES))
    constrain = lambda b: jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_sh), b)  # noqa: E731
    tx = setup.build_policy_optimizer(cfg)  # the optimizer `plan` builds
    d = plan_mod.Depths(cfg, plan_mod.model_config(cfg), mesh, tx).at(3)
    with loops.unrolled_scans():
        fn = make_update_fn(d.graphdef, tx, settings, constrain)
        whole = plan_mod.compile_program(
            fn, d.params, d.opt_state, plan_mod.abstract_batch(16, 64, 32, batch_sh), mesh=mesh
        )
    # The plan counts the optimizer update once per chunk (4) instead of once per mini-batch (2): about 0.1 %.
    assert p.flops == pytest.approx(whole.flops, rel=0.01)


@pytest.mark.slow
def test_prefill_cost_counts_every_layer(tmp_path):
    pytest.importorskip("libtpu")
    cfg = load_config(_cost_config(tmp_path, 3))
    p = plan_mod.plan(cfg, "v5e:2x2", only={"rollout_prefill"}, count_loops=True).programs["rollout_prefill"]
    assert p.cost_counted == "unrolled at 1 and 2 layers, extrapolated to 3"
    # 8 prompts (a round of 2 x 4) of 64 tokens into a prompt-sized cache, the head at the last position only.
    hand = _hand_count(plan_mod.model_config(cfg), 64, 8, 64, 1, passes=1, head_passes=1) / 4
    assert 1.0 <= p.flops / hand <= 1.1
    topo = plan_mod.resolve_topology("v5e:2x2")
    assert p.roofline_s == pytest.approx(
        max(p.flops / topo.chip.peak_flops, p.bytes_accessed / topo.chip.hbm_bandwidth)
    )


def test_cost_falls_back_to_the_compiled_count_when_a_variant_does_not_compile():
    import optax

    from mtgrpo_jax.parallel import make_mesh

    cfg = load_config(None, ["model.overrides.num_hidden_layers=3"])
    mc = plan_mod.model_config(cfg)
    depths = plan_mod.Depths(cfg, mc, make_mesh(fsdp=-1), optax.sgd(0.1))

    def build(depth):
        raise RuntimeError("no such op\nsecond line")

    cost = depths.cost(build)
    assert cost.flops is None and cost.bytes_accessed is None
    assert cost.how.startswith("as compiled") and "RuntimeError: no such op second line" in cost.how
    compiled = plan_mod._Compiled(plan_mod._RefusedMemory(0), flops=7.0, bytes_accessed=3.0, compile_s=0.0)
    report = plan_mod._report("x", compiled, plan_mod.resolve_topology("v5e:2x2"), calls=1, scale=2, cost=cost)
    assert (report.flops, report.bytes_accessed, report.cost_counted) == (14.0, 6.0, cost.how)
    # With --no-count-loops nothing is compiled for the cost and the report says how it was counted.
    off = plan_mod.Depths(cfg, mc, make_mesh(fsdp=-1), optax.sgd(0.1), enabled=False).cost(build)
    assert off.flops is None and off.how.startswith("as compiled") and "--no-count-loops" in off.how
    counted = plan_mod.Cost(100.0, 50.0, "unrolled")
    report = plan_mod._report(
        "x",
        compiled,
        plan_mod.resolve_topology("v5e:2x2"),
        calls=1,
        scale=2,
        cost=counted,
        extra_flops=1.0,
        extra_how=" + more",
    )
    assert (report.flops, report.bytes_accessed, report.cost_counted) == (201.0, 100.0, "unrolled + more")
