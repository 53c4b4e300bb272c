"""The released code's task-weight update (github.com/rsshyam/MT-GRPO, paths under verl/verl/), written
out below as a small NumPy reference that follows the release line by line, and checked against
`mt_grpo_released` / `regularized_released` on the same inputs.

Release lines followed (utils/auto_curriculum/priority_decay.py unless said otherwise):
  316        self.opt = torch.optim.Adam([self.w], lr=lr, weight_decay=gamma)   -> coupled L2 Adam, w_0 = 0
  517        self.batch_acc = np.zeros(...)                                      -> the EMA starts at 0
  871        new_mean = a * prev_mean + (1 - a) * acc   (update_batch_acc, called once per generation
             round from trainer/ppo/ray_trainer.py:1012, resampling rounds included)
  1211-1251  for each mini-batch: delta = calculate_delta(...); combine(...); one opt.step()
  1343       delta = -delta  (max_rate=False: the loss change becomes the improvement)
  1363-1370  clamp(delta, -threshold * lr / 1e-6, +...)  with threshold 0.1 unless delta_threshold is set
  923 / 932  combine: delta + lambda_bias * rewards ('add') or lambda_bias * rewards ('bias_only')
  1248       d = autograd.grad(softmax(w), w, grad_outputs=delta)  -> z * (delta - z.delta)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtgrpo_jax.weighting import TaskSignals, mt_grpo, mt_grpo_released, regularized_released


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


class ReleasedBandit:
    """priority_decay.FamoPriorityDecay with update_object='task_diff_bias', bias_metric='batch_acc',
    fixed_p_each=0, SNR_update_step_threshold=0 (every released MT-GRPO script), in float64."""

    def __init__(
        self,
        k,
        lr=0.025,
        gamma=1e-5,
        lambda_bias=0.2,
        delta_threshold=None,
        bias_only=False,
        decay=0.5,
        training_lr=1e-6,
    ):
        self.w = np.zeros(k)  # line 315
        self.m, self.v, self.t = np.zeros(k), np.zeros(k), 0
        self.lr, self.gamma, self.lambda_bias = lr, gamma, lambda_bias
        self.threshold = 0.1 if delta_threshold is None else delta_threshold  # line 1363
        self.training_lr = training_lr
        self.bias_only, self.decay = bias_only, decay
        self.batch_acc = np.zeros(k)  # line 517

    def update_batch_acc(self, acc_by_arm):  # lines 861-872; arms absent from the round are not in the dict
        for arm, acc in acc_by_arm.items():
            self.batch_acc[arm] = self.decay * self.batch_acc[arm] + (1 - self.decay) * acc

    def _adam_step(self, d):  # torch.optim.Adam(weight_decay=gamma), defaults b=(0.9, 0.999), eps=1e-8
        b1, b2, eps = 0.9, 0.999, 1e-8
        g = d + self.gamma * self.w
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        self.w = self.w - self.lr * (self.m / (1 - b1**self.t)) / (np.sqrt(self.v / (1 - b2**self.t)) + eps)

    def update(self, task_wise_diff_per_batch):
        """task_wise_diff_per_batch: one {arm: loss change} dict per mini-batch (dp_actor.py:485)."""
        rewards = self.batch_acc.copy()  # line 1189, read once before the loop
        for diff in task_wise_diff_per_batch:  # line 1211
            delta = np.array([diff.get(a, 0.0) for a in range(len(self.w))])  # line 1213: absent arm -> 0
            delta = -delta  # line 1343
            bound = self.threshold * (self.training_lr / 1e-6)
            delta = np.clip(delta, -bound, bound)  # line 1370
            delta = self.lambda_bias * rewards if self.bias_only else delta + self.lambda_bias * rewards  # 923/932
            z = softmax(self.w)
            self._adam_step(z * (delta - z @ delta))  # line 1248 (softmax Jacobian^T delta), then opt.step()
        return softmax(self.w)


def _episode(seed, steps=12, k=3, m=4):
    """Per step: per-round accuracies (some tasks missing from some rounds) and per-mini-batch loss
    changes at the release's scale (sums over ~N_k sequences: magnitudes ~0.1-1, so the clip bites)."""
    rng = np.random.default_rng(seed)
    episode = []
    for _ in range(steps):
        rounds = []
        for _ in range(rng.integers(1, 4)):
            present = rng.random(k) < 0.8
            rounds.append({a: float(rng.random()) for a in range(k) if present[a]})
        diffs = []
        for _ in range(m):
            present = rng.random(k) < 0.85
            diffs.append({a: float(rng.normal(0, 0.3)) for a in range(k) if present[a]})
        episode.append((rounds, diffs))
    return episode


def _signals(rounds, diffs, k):
    round_reward = np.full((len(rounds), k), np.nan, np.float32)
    for r, accs in enumerate(rounds):
        for a, acc in accs.items():
            round_reward[r, a] = acc
    # the trainer's improvement is minus the release's loss change; absent (task, mini-batch): 0
    improvement = np.zeros((len(diffs), k), np.float32)
    for i, diff in enumerate(diffs):
        for a, d in diff.items():
            improvement[i, a] = -d
    present = ~np.all(np.isnan(round_reward), axis=0) | np.any(improvement != 0, axis=0)
    return TaskSignals(
        reward=np.nan_to_num(round_reward[-1]), improvement=improvement, present=present, round_reward=round_reward
    )


@pytest.mark.parametrize(
    "lam, gamma, threshold",
    [(0.2, 1e-5, None), (0.3, 1e-4, None), (1.2, 1e-4, 0.2)],
    ids=["exp1", "exp2-0.3", "exp2-1.2"],
)
def test_matches_the_released_bandit_step_by_step(lam, gamma, threshold):
    k = 3
    ref = ReleasedBandit(k, gamma=gamma, lambda_bias=lam, delta_threshold=threshold)
    opt = mt_grpo_released(lam, weight_decay=gamma, improvement_clip=0.1 if threshold is None else threshold)
    state = opt.init(k)
    update = jax.jit(opt.update)
    for rounds, diffs in _episode(0):
        for accs in rounds:
            ref.update_batch_acc(accs)
        expected = ref.update(diffs)
        z, state = update(_signals(rounds, diffs, k), state)
        np.testing.assert_allclose(np.asarray(state.reward_ema), ref.batch_acc, atol=1e-6)
        np.testing.assert_allclose(np.asarray(z), expected, atol=2e-6)
    assert np.abs(np.asarray(z) - 1 / k).max() > 0.01  # the weights moved


def test_four_weight_steps_differ_from_one_step_on_the_clipped_sum():
    """The released variant steps once per mini-batch; the paper's makes one step on the summed signal."""
    k = 3
    rounds, diffs = _episode(1, steps=1)[0]
    sig = _signals(rounds, diffs, k)
    released = mt_grpo_released(0.2)
    z4, s4 = released.update(sig, released.init(k))
    z1, s1 = released.update(sig._replace(improvement=np.sum(sig.improvement, axis=0)), released.init(k))
    assert int(s4.opt_state[1].count) == 4 and int(s1.opt_state[1].count) == 1
    assert np.abs(np.asarray(z4) - np.asarray(z1)).max() > 1e-3
    # the paper's optimizer sums the rows: [M, K] and its row-sum give identical weights
    paper = mt_grpo(0.2, improvement_clip=0.1)
    zp, _ = paper.update(sig, paper.init(k))
    zs, _ = paper.update(sig._replace(improvement=np.sum(sig.improvement, axis=0)), paper.init(k))
    np.testing.assert_array_equal(np.asarray(zp), np.asarray(zs))


def test_clip_bounds_each_mini_batch_improvement():
    k = 2
    big = TaskSignals(reward=np.zeros(k), improvement=np.array([[5.0, -5.0]] * 4, np.float32))
    edge = TaskSignals(reward=np.zeros(k), improvement=np.array([[0.1, -0.1]] * 4, np.float32))
    opt = mt_grpo_released(0.2, improvement_clip=0.1)
    za, _ = opt.update(big, opt.init(k))
    zb, _ = opt.update(edge, opt.init(k))
    np.testing.assert_allclose(np.asarray(za), np.asarray(zb), atol=1e-7)
    ref = ReleasedBandit(k)
    expected = ref.update([{0: -5.0, 1: 5.0}] * 4)
    np.testing.assert_allclose(np.asarray(za), expected, atol=2e-6)


def test_reward_ema_starts_at_zero_and_moves_every_round():
    k = 2
    opt = mt_grpo_released(0.2)
    rounds = np.array([[1.0, np.nan], [1.0, 0.5], [np.nan, 0.5]], np.float32)
    _, state = opt.update(
        TaskSignals(reward=np.zeros(k), improvement=np.zeros((4, k)), round_reward=rounds), opt.init(k)
    )
    # task 0: 0 -> 0.5 -> 0.75 (absent in round 3); task 1: 0 -> (absent) -> 0.25 -> 0.375
    np.testing.assert_allclose(np.asarray(state.reward_ema), [0.75, 0.375], atol=1e-7)


def test_absent_tasks_keep_their_lambda_reward_term():
    """The release has no notion of absence: a task without rows in a mini-batch has I = 0 there and is
    still stepped with lam * (its EMA)."""
    k = 3
    ref = ReleasedBandit(k, lambda_bias=0.5)
    ref.update_batch_acc({0: 0.2, 1: 0.9, 2: 0.6})
    ref.update_batch_acc({0: 0.3})
    expected = ref.update([{0: -0.02}] * 4)
    opt = mt_grpo_released(0.5)
    rr = np.array([[0.2, 0.9, 0.6], [0.3, np.nan, np.nan]], np.float32)
    imp = np.zeros((4, k), np.float32)
    imp[:, 0] = 0.02
    z, _ = opt.update(
        TaskSignals(reward=rr[0], improvement=imp, present=np.array([True, False, False]), round_reward=rr), opt.init(k)
    )
    np.testing.assert_allclose(np.asarray(z), expected, atol=2e-6)
    assert abs(float(z[1]) - 1 / 3) > 1e-3  # the absent tasks' logits moved


@pytest.mark.parametrize("eta", [1e-5, 5e-4, 1e-2])
def test_subroutine_2_as_released_matches_the_bias_only_bandit(eta):
    k = 3
    ref = ReleasedBandit(k, gamma=eta, lambda_bias=0.2, bias_only=True)
    opt = regularized_released(eta, lam=0.2, steps_per_update=4)
    state, update = opt.init(k), jax.jit(opt.update)
    rng = np.random.default_rng(3)
    for _ in range(15):
        acc = rng.uniform(0, 1, k)
        ref.update_batch_acc(dict(enumerate(acc)))
        expected = ref.update([{}] * 4)  # the loss change is read but ignored by 'bias_only'
        z, state = update(TaskSignals(reward=acc, round_reward=acc[None].astype(np.float32)), state)
        np.testing.assert_allclose(np.asarray(z), expected, atol=1e-5)  # float32 vs float64 over 60 Adam steps


def test_subroutine_2_collapses_onto_the_lowest_reward_task_as_eta_shrinks():
    """Fixed rewards: with Adam + coupled L2 the weights move onto the worst task within tens of steps,
    the more completely the smaller eta (the paper's Figures 2 / 20)."""
    acc = np.array([0.6, 0.2, 0.8], np.float32)
    worst = {}
    for eta in (1e-2, 5e-4, 1e-5):
        opt = regularized_released(eta, lam=0.2, steps_per_update=4)
        state, update = opt.init(3), jax.jit(opt.update)
        for _ in range(60):
            z, state = update(TaskSignals(reward=acc, round_reward=acc[None]), state)
        worst[eta] = float(z[1])
        assert int(np.argmax(np.asarray(z))) == 1
    assert worst[1e-5] > worst[5e-4] > worst[1e-2]
    assert worst[1e-5] > 0.95, worst
    # the plain-descent form of the paper's appendix barely moves in the same number of steps
    from mtgrpo_jax.weighting import regularized

    plain = regularized(1e-5, lam=0.2)
    state, update = plain.init(3), jax.jit(plain.update)
    for _ in range(60):
        zp, state = update(TaskSignals(reward=acc), state)
    assert float(zp[1]) < 0.4, float(zp[1])


def test_non_finite_improvements_are_counted_and_the_task_read_as_absent():
    k = 3
    opt = mt_grpo_released(0.2)
    imp = np.array([[np.inf, 0.01, 0.0]] * 4, np.float32)
    z, state = opt.update(TaskSignals(reward=np.full(k, 0.5), improvement=imp), opt.init(k))
    assert np.all(np.isfinite(np.asarray(z)))
    np.testing.assert_array_equal(np.asarray(state.rejected), [1, 0, 0])
    # exactly as if the task had been absent (no EMA move, I = 0; its lam * J term still counts)
    z0, _ = opt.update(
        TaskSignals(
            reward=np.full(k, 0.5),
            improvement=np.where(np.isfinite(imp), imp, 0.0),
            present=np.array([False, True, True]),
        ),
        opt.init(k),
    )
    np.testing.assert_array_equal(np.asarray(z), np.asarray(z0))
    with pytest.raises(ValueError, match="improvement must be"):
        opt.update(TaskSignals(reward=np.zeros(k), improvement=np.zeros((2, 4))), opt.init(k))
    with pytest.raises(ValueError, match="steps_per_update"):
        regularized_released(1e-2, steps_per_update=0)
    assert jnp.allclose(opt.weights(opt.init(k)), 1 / k)
