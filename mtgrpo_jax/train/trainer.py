"""The MT-GRPO trainer: one loop for every method (GRPO, DAPO, SEC, MT-GRPO and the ablations are presets).

One step, as ARCHITECTURE.md (the repository's root) draws it:
  sampler (ratio-preserving or plain) -> rollout -> scoring -> advantages + zero-gradient filter
  -> fixed-shape batch -> jitted, sharded policy update -> improvement I_k -> task-weight update -> metrics.

Every random choice flows from `cfg.seed` and the step number, and every piece of host state a resumed
run needs (sampler, data streams, task weights, metric history) is in the checkpoint, so a run killed
and resumed continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtgrpo_jax.config import Config, SamplerCfg, save_config
from mtgrpo_jax.data import TaskSet
from mtgrpo_jax.models import save_pretrained
from mtgrpo_jax.parallel import batch_sharding, host_to_global, to_host
from mtgrpo_jax.parallel.mesh import on_mesh
from mtgrpo_jax.rl import group_advantages, zero_gradient_mask
from mtgrpo_jax.rollout import Buckets
from mtgrpo_jax.tasks import score_batch
from mtgrpo_jax.train import setup
from mtgrpo_jax.train.batch import Group, build_batch
from mtgrpo_jax.train.checkpoint import Checkpointer
from mtgrpo_jax.train.evaluate import evaluate_tasks
from mtgrpo_jax.train.metrics import MetricsWriter, memory_metrics
from mtgrpo_jax.train.plan import resolve_micro_batches, update_settings
from mtgrpo_jax.train.policy import Policy
from mtgrpo_jax.train.sft import run_sft
from mtgrpo_jax.train.signals import GroupRecord, step_signals
from mtgrpo_jax.train.update import (
    init_opt_state,
    make_logprob_fn,
    make_objective_fn,
    make_update_fn,
    objective_at_behaviour,
)
from mtgrpo_jax.weighting import TaskSignals


def _agree_on_scores(rewards: np.ndarray, correct: np.ndarray, formatted: np.ndarray):
    """Process 0's scores, on every process.

    Every process scores the same completions, but the verifiers run under a time limit on each host's
    own CPUs: one host timing out where another does not would make them keep different groups, build
    different batches and eventually wait on each other in a collective forever."""
    from jax.experimental import multihost_utils

    packed = np.stack([rewards.astype(np.float32), correct.astype(np.float32), formatted.astype(np.float32)])
    packed = np.asarray(multihost_utils.broadcast_one_to_all(packed))
    return packed[0], packed[1] > 0.5, packed[2] > 0.5


def _filter_groups(s: SamplerCfg, rewards: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """[P] keep-mask of the zero-gradient filter `s.filter` on a round's groups ([P, G] rewards, correct)."""
    if s.filter == "none":
        return np.ones(len(rewards), bool)
    if s.filter == "lenient" and not s.lenient_drops_all_equal:
        # The release with pure_acc_filter=False (trainer/ppo/ray_trainer.py, the uid loop): only all-0 and
        # all-1 groups go; a group of equal partial-credit rewards (all 0.1) stays, with zero advantage.
        return ~(np.all(rewards == 0, axis=1) | np.all(rewards == 1, axis=1))
    signal_ = correct if s.filter == "strict" else rewards
    return np.asarray(zero_gradient_mask(jnp.asarray(signal_), mode=s.filter))


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.mesh = setup.build_mesh(cfg)
        self.run_dir = Path(cfg.output_dir)
        self.is_primary = jax.process_index() == 0
        self.model, self.tokenizer = setup.build_model(cfg, self.mesh)
        # The prompts that suit the checkpoint, decided once and written into the config the run saves.
        self.cfg = cfg = self._resolve_prompts(cfg)
        self.tasks = setup.build_tasks(cfg)
        self.names = [t.name for t in self.tasks]
        self.policy = Policy(self.model, self.tokenizer, cfg.rollout, self.mesh)
        self.taskset = TaskSet({t.name: t.train for t in self.tasks}, seed=cfg.seed)
        s = cfg.sampler
        self.sampler = setup.build_sampler(cfg, len(self.tasks))
        self.weight_opt = setup.build_weight_optimizer(cfg, len(self.tasks))
        self.weight_state = self.weight_opt.init(len(self.tasks))
        self.weights = np.asarray(to_host(self.weight_opt.weights(self.weight_state)), np.float32)

        self.graphdef, self.params, self.rest = nnx.split(self.model, nnx.Param, ...)
        self.tx = setup.build_policy_optimizer(cfg)
        self.opt_state = init_opt_state(self.tx, self.params, self.mesh)
        # "auto": the fewest micro-batches whose update fits the devices' memory (see train.plan).
        self.micro_batches = resolve_micro_batches(cfg, self.mesh, self.graphdef, self.params, self.tx)
        self.settings = update_settings(cfg, self.micro_batches)
        self.rows = s.batch_size * s.group_size
        self.micro_rows = self.rows // (cfg.optim.mini_batches * self.micro_batches)
        self.batch_sharding = batch_sharding(self.mesh)
        constrain = lambda b: jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, self.batch_sharding), b)
        self.update_fn = make_update_fn(self.graphdef, self.tx, self.settings, constrain)
        chunks = self.rows // self.micro_rows
        self.objective_fn = make_objective_fn(self.graphdef, self.settings, chunks)
        self.logprob_fn = make_logprob_fn(
            self.graphdef,
            self.settings.completion_len,
            self.settings.temperature,
            chunks,
            seq_chunk=cfg.loss.logprob_chunk,
            vocab_chunk=cfg.loss.vocab_chunk,
        )
        # The step's programs run (and `mtgrpo plan` compiles them) with the mesh active.
        self.update_fn, self.objective_fn, self.logprob_fn = (
            on_mesh(self.mesh, f) for f in (self.update_fn, self.objective_fn, self.logprob_fn)
        )
        self.ref_params = jax.tree.map(jnp.copy, self.params) if cfg.loss.beta > 0 else None
        self.recompute_old_logprobs = cfg.optim.recompute_old_logprobs or (
            self.settings.improvement != "none" and cfg.weighting.improvement_old_logprobs == "recompute"
        )
        self.history: list[dict] = []
        self.step = 0
        self._stop_requested = False
        self._in_loop = False
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep=cfg.train.keep_checkpoints)

    def _resolve_prompts(self, cfg: Config) -> Config:
        from mtgrpo_jax.train.policy import resolve_prompts

        cfg, self.prompt_choice = resolve_prompts(cfg, self.tokenizer)
        if self.is_primary and cfg.logging.console:
            print(f"[mtgrpo] {self.prompt_choice.describe()}", flush=True)
        return cfg

    # ------------------------------------------------------------------------------------------------ state
    def _arrays(self) -> dict:
        # The task-weight state is tiny host-side math that every process repeats on its own first device;
        # it is saved as NumPy (orbax refuses process-local jax.Arrays in a multi-process save).
        return {"params": self.params, "opt_state": self.opt_state, "weight_state": to_host(self.weight_state)}

    def _host_state(self) -> dict:
        return {
            "step": self.step,
            "weights": [float(x) for x in self.weights],
            "sampler": self.sampler.get_state(),
            "taskset": self.taskset.get_state(),
            "history": self.history,
        }

    def save_checkpoint(self) -> None:
        self.checkpointer.save(self.step, self._arrays(), self._host_state())

    def maybe_restore(self) -> bool:
        found = self.checkpointer.restore_latest(self._arrays(), log=lambda line: print(line, flush=True))
        if found is None:
            return False
        _, arrays, host = found
        self.params, self.opt_state = arrays["params"], arrays["opt_state"]
        self.weight_state = jax.tree.map(jnp.asarray, arrays["weight_state"])
        self.step = int(host["step"])
        self.weights = np.asarray(host["weights"], np.float32)
        self.sampler.set_state(host["sampler"])
        self.taskset.set_state(host["taskset"])
        self.history = list(host["history"])
        return True

    # ------------------------------------------------------------------------------------------------ step
    def _rollout_key(self, step: int, call: int) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.cfg.seed), step), call)

    def _generate_groups(self, task_ids: list[int], step: int, call: int, stats: dict) -> list[tuple[bool, Group]]:
        """The sampler's callable: pull prompts, roll out G each, score, compute advantages and acceptance."""
        cfg = self.cfg
        examples: list[dict] = [None] * len(task_ids)  # type: ignore[list-item]
        for t in sorted(set(task_ids)):
            slots = [i for i, x in enumerate(task_ids) if x == t]
            for i, ex in zip(slots, self.taskset.take(t, len(slots))):
                examples[i] = ex
        prompts = [self.policy.prompt_ids(self.tasks[t].task, ex) for t, ex in zip(task_ids, examples)]
        G = cfg.sampler.group_size
        t0 = time.perf_counter()
        out = self.policy.generate(prompts, self._rollout_key(step, call), n=G, params=self.params)
        t1 = time.perf_counter()
        by_name = {self.tasks[t].name: self.tasks[t].task for t in set(task_ids)}
        run_items = [dict(ex, task=self.tasks[t].name) for t, ex in zip(task_ids, examples) for _ in range(G)]
        scores, score_stats = score_batch(
            run_items,
            list(out.texts),
            workers=cfg.train.score_workers,
            timeout_s=cfg.train.score_timeout_s,
            tasks=by_name,
        )
        score_stats = score_stats.as_dict()
        t2 = time.perf_counter()
        rewards = np.asarray([s.reward for s in scores], np.float32).reshape(-1, G)
        correct = np.asarray([s.correct for s in scores], bool).reshape(-1, G)
        formatted = np.asarray([s.formatted for s in scores], bool).reshape(-1, G)
        if jax.process_count() > 1:
            rewards, correct, formatted = _agree_on_scores(rewards, correct, formatted)
        adv = np.asarray(group_advantages(jnp.asarray(rewards), estimator=cfg.loss.advantage, std=cfg.loss.std))
        keep = _filter_groups(cfg.sampler, rewards, correct)
        tokens, mask, logp = np.asarray(out.tokens), np.asarray(out.mask), np.asarray(out.logprobs)
        stats["rollout"] += t1 - t0
        stats["scoring"] += t2 - t1
        stats["tokens"] += int(mask.sum())
        for k in ("errors", "timeouts"):
            stats[f"score_{k}"] += int(score_stats.get(k, 0))
        groups = []
        for i, (t, ex) in enumerate(zip(task_ids, examples)):
            rows = slice(i * G, (i + 1) * G)
            g = Group(
                t, ex, prompts[i], tokens[rows], mask[rows], logp[rows], rewards[i], correct[i], formatted[i], adv[i]
            )
            stats["generated"].append(GroupRecord(t, call, rewards[i], correct[i], bool(keep[i])))
            groups.append((bool(keep[i]), g))
        return groups

    def _update(self, batch) -> tuple[np.ndarray, dict, dict, float]:
        """The policy update, then the per-task improvement rows [M, K] ([1, K]; zeros without an estimator).

        Returns (rows, update metrics, every estimator's rows when diagnosing, seconds spent on the
        step_mean estimator's own forward)."""
        K, s = len(self.tasks), self.settings
        step_mean = s.improvement_forward
        before = objective_at_behaviour(s, batch) if step_mean else None
        self.params, self.opt_state, upd, rows = self.update_fn(self.params, self.opt_state, batch)
        upd = to_host(upd)
        others = {
            k.split("/", 1)[1]: np.asarray(upd.pop(k), np.float32) for k in list(upd) if k.startswith("improvement/")
        }
        step_mean_s = 0.0
        if step_mean:
            t = time.perf_counter()
            others["step_mean"] = np.asarray(to_host(self.objective_fn(self.params, batch) - before), np.float32)[
                None, :
            ]
            step_mean_s = time.perf_counter() - t
        if s.improvement == "step_mean":
            rows = others["step_mean"]
        elif rows is not None:
            others[s.improvement] = rows = np.asarray(to_host(rows), np.float32)
        rows = np.zeros((1, K), np.float32) if rows is None else rows
        return rows, upd, (others if s.improvement_diagnostics else {}), step_mean_s

    def _sampling_weights(self, step: int) -> np.ndarray:
        """The task weights the sampler draws from: the weight optimizer's, restricted to the current
        stage's tasks under sequential training (`train.stages`)."""
        end = 0
        for stage in self.cfg.train.stages:
            end += stage.steps
            if step <= end:
                mask = np.isin(self.names, stage.tasks)
                w = np.where(mask, self.weights, 0.0)
                return (w / w.sum() if w.sum() > 0 else mask / mask.sum()).astype(np.float32)
        return self.weights

    def _sample_kwargs(self, step: int) -> dict:
        """Per-step sampler options: ratio preservation from step `sampler.ratio_from_step` on (steps count
        from 1, as the release's `global_steps >= ensure_famo_ratio_from`)."""
        if self.cfg.sampler.kind != "ratio_preserving":
            return {}
        return {"preserve_ratio": step >= self.cfg.sampler.ratio_from_step}

    def train_step(self) -> dict:
        cfg, K = self.cfg, len(self.tasks)
        step = self.step + 1
        t_start = time.perf_counter()
        stats: dict[str, Any] = {
            "rollout": 0.0,
            "scoring": 0.0,
            "tokens": 0,
            "generated": [],
            "score_errors": 0,
            "score_timeouts": 0,
        }
        calls = iter(range(1_000_000))
        result = self.sampler.sample(
            self._sampling_weights(step),
            lambda ids: self._generate_groups(list(ids), step, next(calls), stats),
            **self._sample_kwargs(step),
        )
        t_sampled = time.perf_counter()
        groups: list[Group] = list(result.groups)
        prompt_len = Buckets.pick(sorted(cfg.rollout.prompt_buckets), max([len(g.prompt_ids) for g in groups] or [1]))
        batch_np, valid = build_batch(
            groups,
            num_rows=self.rows,
            prompt_len=prompt_len,
            completion_len=cfg.rollout.max_new_tokens,
            pad_id=self.policy.pad_id,
            rng=np.random.default_rng([cfg.seed, step]),
        )
        # Every process built the same batch; each places only its own rows (no all-gather to compare them).
        batch = host_to_global(batch_np, self.batch_sharding)
        t_logprobs = time.perf_counter()
        if self.recompute_old_logprobs:
            batch = batch._replace(old_logp=self.logprob_fn(self.params, batch.input_ids, batch.attention_mask))
        if self.ref_params is not None:
            batch = batch._replace(ref_logp=self.logprob_fn(self.ref_params, batch.input_ids, batch.attention_mask))
        jax.block_until_ready((batch.old_logp, batch.ref_logp))
        t_update = time.perf_counter()
        empty = not valid.any()
        if empty:  # nothing survived the filter: an update over padding would only cost time; skip and count it
            # the update's metric keys (traced, not run), as zeros: no tokens, no loss, nothing skipped as non-finite
            with jax.set_mesh(self.mesh):
                shapes = jax.eval_shape(self.update_fn.__wrapped__, self.params, self.opt_state, batch)[2]
            upd = {k: 0.0 for k in shapes if not k.startswith("improvement/")}
            improvement_rows, diagnostics, t_step_mean = np.zeros((1, K), np.float32), {}, 0.0
            print(f"[mtgrpo] step {step}: no valid rows after filtering; policy update skipped", flush=True)
        else:
            improvement_rows, upd, diagnostics, t_step_mean = self._update(batch)
        t_weights = time.perf_counter()

        sig = step_signals(
            K,
            stats["generated"],
            [g.task_id for g in groups],
            [float(np.abs(g.advantages).mean()) for g in groups],
            groups_generated=result.groups_generated,
            accepted_generated=result.accepted_generated,
            kept_counts=result.counts,
        )
        released = cfg.weighting.released_parity
        signals = TaskSignals(
            reward=jnp.asarray(sig.accuracy if released else sig.reward),
            improvement=jnp.asarray(improvement_rows),
            abs_advantage=jnp.asarray(sig.abs_advantage),
            present=jnp.asarray(sig.present),
            round_reward=jnp.asarray(sig.round_accuracy),
        )
        new_weights, self.weight_state = self.weight_opt.update(signals, self.weight_state)
        weights_used = self.weights
        self.weights = np.asarray(to_host(new_weights), np.float32)
        t_end = time.perf_counter()

        self.step = step
        improvement = improvement_rows.sum(axis=0)
        record: dict[str, Any] = {"step": step}
        for k, name in enumerate(self.names):
            record[f"task/{name}/reward"] = float(sig.reward[k])
            record[f"task/{name}/accuracy"] = float(sig.accuracy[k])
            record[f"task/{name}/zero_grad_rate"] = float(sig.zero_grad_rate[k])
            record[f"task/{name}/filtered_rate"] = float(sig.filtered_rate[k])  # rejected by sampler.filter
            record[f"task/{name}/weight"] = float(weights_used[k])
            record[f"task/{name}/next_weight"] = float(self.weights[k])
            record[f"task/{name}/share"] = float(sig.share[k])
            record[f"task/{name}/groups_generated"] = float(sig.generated[k])
            record[f"task/{name}/improvement"] = float(improvement[k])
            for est, rows in diagnostics.items():
                record[f"task/{name}/improvement/{est}"] = float(rows[:, k].sum())
        # The sampler's own view: rounds, acceptance, share gap, and (ratio-preserving) rho and inflation.
        record.update(result.metrics(self.names))
        record.update(
            {
                "sampler/groups_kept": len(groups),
                "rollout/tokens": stats["tokens"],
                "rollout/tokens_per_s": stats["tokens"] / max(stats["rollout"], 1e-9),
                "scoring/errors": stats["score_errors"],
                "scoring/timeouts": stats["score_timeouts"],
                "time/sampling": (t_sampled - t_start) - stats["rollout"] - stats["scoring"],
                "time/rollout": stats["rollout"],
                "time/scoring": stats["scoring"],
                "time/old_logprobs": t_update - t_logprobs,  # recomputed old (and reference) log-probs
                "time/update": t_weights - t_update - t_step_mean,  # the in-update estimators included
                "time/improvement": t_step_mean,  # the step_mean estimator's forward after the update
                "time/weights": t_end - t_weights,
                "time/step": t_end - t_start,
                "train/valid_rows": int(valid.sum()),
                "train/empty_step": int(empty),
                "train/seq_len": prompt_len + cfg.rollout.max_new_tokens,
            }
        )
        record.update(memory_metrics())
        record.update({f"train/{k}": float(v) for k, v in upd.items()})
        if upd.get("skipped", 0) > 0:
            print(
                f"[mtgrpo] step {step}: {int(upd['skipped'])} non-finite update(s) skipped; parameters left unchanged",
                flush=True,
            )
        return record

    # ------------------------------------------------------------------------------------------------ run
    def evaluate(self) -> dict:
        key = jax.random.fold_in(jax.random.key(self.cfg.seed + 1), self.step)
        return evaluate_tasks(
            self.policy, self.tasks, self.cfg.eval, self.cfg.train, step=self.step, key=key, params=self.params
        )

    def _request_stop(self, signum, frame) -> None:  # noqa: ARG002
        # In the step loop: finish the step, checkpoint, exit. Before the first checkpoint (warm start,
        # first evaluation) there is nothing worth saving: stop at once; a rerun starts over.
        if not self._in_loop:
            raise SystemExit(143)
        self._stop_requested = True

    def _stop_agreed(self) -> bool:
        """Whether any process got SIGTERM. The processes receive it at different moments, but all must
        stop (and checkpoint) after the same step, or the others would wait in a collective forever."""
        if jax.process_count() == 1:
            return self._stop_requested
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(self._stop_requested))))

    def log(self, writer: MetricsWriter, record: dict) -> None:
        written = writer.write(record["step"], record)
        self.history.append(written if written is not None else record)

    def run(self) -> dict:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.is_primary:
            save_config(cfg, self.run_dir / "config.yaml")
        resumed = self.maybe_restore()
        writer = MetricsWriter(
            self.run_dir,
            tensorboard=cfg.logging.tensorboard,
            wandb={"project": cfg.logging.wandb_project} if cfg.logging.wandb else None,
            console=cfg.logging.console,
            is_primary=self.is_primary,
            resume_step=self.step if resumed else -1,
            total_steps=cfg.train.steps,
        )
        previous = signal.signal(signal.SIGTERM, self._request_stop)
        try:
            if not resumed:
                if cfg.sft.steps > 0:
                    self.params, sft_record = run_sft(
                        cfg, self.tasks, self.policy, self.graphdef, self.params, self.batch_sharding
                    )
                    self.log(writer, sft_record)
                if cfg.train.eval_every >= 0:
                    self.log(writer, self.evaluate())
                self.save_checkpoint()
            else:
                print(f"[mtgrpo] resumed from step {self.step} in {self.run_dir}", flush=True)
            self._in_loop = True
            stop = False
            while self.step < cfg.train.steps and not (stop := self._stop_agreed()):
                self.log(writer, self.train_step())
                last = self.step == cfg.train.steps
                if (
                    cfg.train.eval_every
                    and (self.step % cfg.train.eval_every == 0 or last)
                    or (last and not cfg.train.eval_every)
                ):
                    t = time.perf_counter()
                    ev = self.evaluate()
                    ev["time/evaluation"] = time.perf_counter() - t
                    self.log(writer, ev)
                if last or (cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0):
                    self.save_checkpoint()
            if stop:
                if self.checkpointer.latest_step() != self.step:  # the step may have just been checkpointed
                    self.save_checkpoint()
                print(
                    f"[mtgrpo] SIGTERM: checkpoint saved at step {self.step}; rerun the same command to resume",
                    flush=True,
                )
                return {"status": "preempted", "step": self.step}
            # Every process takes part (the sharded parameters are gathered); only process 0 writes.
            save_pretrained(nnx.merge(self.graphdef, self.params, self.rest), self.run_dir / "hf_final")
            if self.is_primary:
                self.tokenizer.save_pretrained(self.run_dir / "hf_final")
        finally:
            signal.signal(signal.SIGTERM, previous)
            writer.close()
        return {"status": "done", "step": self.step}
