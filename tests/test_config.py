"""The typed config: presets, dotted overrides, and one-line errors that name the key at fault."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mtgrpo_jax.config import ConfigError, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]
METHODS = sorted((ROOT / "configs" / "methods").glob("*.yaml"))
ALL_PRESETS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_defaults_validate():
    cfg = load_config(None)
    assert cfg.sampler.kind == "ratio_preserving" and cfg.optim.learning_rate == 1e-6
    assert (cfg.optim.b1, cfg.optim.b2) == (0.9, 0.99)


@pytest.mark.parametrize("path", ALL_PRESETS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_preset_is_a_valid_config(path):
    cfg = load_config(path)
    if "methods" in path.parts:
        assert cfg.method == path.stem


def test_method_preset_merges_over_a_config():
    cfg = load_config(ROOT / "configs" / "demo.yaml", presets=[ROOT / "configs" / "methods" / "dapo.yaml"])
    assert cfg.method == "dapo" and cfg.sampler.kind == "dynamic" and cfg.loss.eps_high == 0.28
    assert cfg.tasks  # the demo's tasks survive the merge


def test_dotted_overrides_reach_every_level(tmp_path):
    cfg = load_config(
        None,
        [
            "optim.learning_rate=3e-4",
            "sampler.batch_size=16",
            "output_dir=" + str(tmp_path),
            "rollout.prompt_buckets=[64,128]",
            "weighting.kind=mt_grpo",
            "weighting.lam=0.5",
        ],
    )
    assert cfg.optim.learning_rate == 3e-4 and cfg.sampler.batch_size == 16
    assert cfg.rollout.prompt_buckets == [64, 128] and cfg.weighting.lam == 0.5
    assert cfg.output_dir == str(tmp_path)


def test_list_items_are_reachable_by_index():
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["tasks.0.train.n=7"])
    assert cfg.tasks[0].train.n == 7
    with pytest.raises(ConfigError, match="tasks has no item '9'"):
        load_config(ROOT / "configs" / "demo.yaml", ["tasks.9.train.n=7"])


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.lrr=1", "unknown key 'optim.lrr'"),
        ("bogus=1", "unknown key 'bogus'"),
        ("sampler.batch_size=abc", "sampler.batch_size"),
        ("weighting.lam=-1", "weighting.lam"),
        ("optim.mini_batches=5", "optim.mini_batches"),
        ("loss.aggregation=sum", "loss.aggregation"),
        ("noequals", "expected key=value"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert needle in message and "\n" not in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampler: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(loop)


def test_static_weights_must_match_the_tasks():
    with pytest.raises(ConfigError, match="weighting.weights"):
        load_config(ROOT / "configs" / "demo.yaml", ["weighting.kind=static", "weighting.weights=[1.0]"])


def test_paper_experiments_carry_the_published_hyperparameters():
    exp1 = load_config(ROOT / "configs" / "paper" / "exp1.yaml")
    assert (exp1.sampler.batch_size, exp1.sampler.group_size, exp1.optim.mini_batches) == (32, 72, 4)
    assert exp1.optim.learning_rate == 1e-6 and (exp1.loss.eps_low, exp1.loss.eps_high) == (0.2, 0.28)
    assert exp1.weighting.kind == "mt_grpo" and exp1.weighting.lam == 0.2
    assert (exp1.weighting.learning_rate, exp1.weighting.weight_decay) == (0.025, 1e-5)
    assert exp1.sampler.filter == "strict" and exp1.sampler.resample_budget == 10 and exp1.train.steps == 720
    assert [t.train.level for t in exp1.tasks] == [2, 2, 2] and exp1.eval.n == 8 and exp1.eval.temperature == 1.0
    exp2 = load_config(ROOT / "configs" / "paper" / "exp2.yaml")
    assert len(exp2.tasks) == 9 and (exp2.sampler.batch_size, exp2.sampler.group_size) == (256, 8)
    assert exp2.sampler.filter == "lenient" and exp2.sampler.resample_budget == 2
    assert exp2.weighting.weight_decay == 1e-4
    exp3 = load_config(ROOT / "configs" / "paper" / "exp3.yaml")
    assert exp3.train.steps == 150 and exp3.weighting.lam == 0.2 and len(exp3.tasks) == 2
    for cfg in (exp1, exp2, exp3):
        for task in cfg.tasks:
            for src in (task.train, task.eval):
                if src is not None and src.path is not None:
                    assert (ROOT / src.path).is_file(), src.path  # every data file a paper config names exists


PAPER = {
    "exp1": dict(filter="strict", lam=0.2, weight_decay=1e-5, budget=10, clip=0.1),
    "exp2": dict(filter="lenient", lam=0.3, weight_decay=1e-4, budget=2, clip=0.1),
}


@pytest.mark.parametrize("exp", sorted(PAPER))
@pytest.mark.parametrize("method", [None] + [p.stem for p in METHODS])
def test_method_presets_keep_the_experiments_own_values(exp, method):
    """`--method` never overwrites the experiment's filter, lam, weight decay or budget (issue 13, row 6),
    except where the experiment's own `methods:` block says so."""
    cfg = load_config(ROOT / "configs" / "paper" / f"{exp}.yaml", method=method)
    want = PAPER[exp]
    assert cfg.method == (method or "mt_grpo")
    assert cfg.sampler.resample_budget == want["budget"] and cfg.weighting.weight_decay == want["weight_decay"]
    assert cfg.train.box_last_line_only  # the released last-line answer reader
    block = {
        "grpo": dict(filter="none"),
        "sec_grpo": dict(filter="none"),
        "mt_grpo_reg": dict(lam=0.2),
        "grpo_iwu": dict(lam=0.25, clip=0.1) if exp == "exp1" else dict(lam=1.2, clip=0.2),
    }.get(method, {})
    want = {**want, **block}
    assert cfg.sampler.filter == want["filter"]
    assert cfg.weighting.lam == want["lam"] and cfg.weighting.improvement_clip == want["clip"]
    # what the method owns still comes from its preset
    kinds = {"dapo": "dynamic", "sec_dapo": "dynamic", "grpo_iwu": "dynamic", "grpo": "plain", "sec_grpo": "plain"}
    assert cfg.sampler.kind == kinds.get(method, "ratio_preserving")
    released = method == "mt_grpo_released"
    assert cfg.sampler.variant == ("released" if released else "paper") and cfg.weighting.released_parity == (
        released or method == "mt_grpo_reg"
    )
    assert cfg.optim.b2 == (0.999 if released else 0.99)
    assert cfg.sampler.budget_counts == (
        "generations" if method in ("dapo", "sec_dapo", "mt_grpo_released") else "resamples"
    )
    assert cfg.sampler.acceptance_aware == (not released or exp == "exp2")
    assert cfg.sampler.ratio_from_step == (10 if released and exp == "exp2" else 0)


def test_config_command_prints_what_train_would_run(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtgrpo_jax.cli",
            "config",
            "--config",
            str(ROOT / "configs" / "paper" / "exp2.yaml"),
            "--method",
            "dapo",
            "weighting.lam=0.9",
            "output_dir=" + str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    expected = load_config(
        ROOT / "configs" / "paper" / "exp2.yaml", ["weighting.lam=0.9", "output_dir=" + str(tmp_path)], method="dapo"
    )
    assert printed == yaml.safe_load(dump_config(expected))
    assert (
        printed["method"] == "dapo" and printed["sampler"]["filter"] == "lenient" and printed["weighting"]["lam"] == 0.9
    )
    bad = subprocess.run(
        [sys.executable, "-m", "mtgrpo_jax.cli", "config", "--method", "nope"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert bad.returncode == 2 and "no preset 'nope'" in bad.stderr and bad.stderr.count("\n") <= 1


def test_sequential_stages_must_cover_the_steps_and_name_tasks():
    for order, first in (("cza", "countdown-medium"), ("zac", "zebra-medium")):
        cfg = load_config(ROOT / "configs" / "paper" / f"exp1_sequential_{order}.yaml")
        assert cfg.method == "dapo" and [s.steps for s in cfg.train.stages] == [240, 240, 240]
        assert cfg.train.stages[0].tasks == [first] and cfg.train.steps == 720
    with pytest.raises(ConfigError, match="train.stages: the stages' steps add up to 240"):
        load_config(ROOT / "configs" / "paper" / "exp1.yaml", ["train.stages=[{tasks: [zebra-medium], steps: 240}]"])
    with pytest.raises(ConfigError, match="train.stages.0.tasks: no task named 'zebra'"):
        load_config(ROOT / "configs" / "paper" / "exp1.yaml", ["train.stages=[{tasks: [zebra], steps: 720}]"])


def test_a_config_that_bases_on_a_method_preset_refuses_another_method(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"base: {ROOT / 'configs' / 'methods' / 'mt_grpo.yaml'}\nweighting: {{lam: 0.3}}\n")
    assert load_config(exp).weighting.kind == "mt_grpo"
    assert load_config(exp, method="mt_grpo").weighting.lam == 0.3
    with pytest.raises(ConfigError, match="method preset mt_grpo.yaml, which would win over --method"):
        load_config(exp, method="dapo")
