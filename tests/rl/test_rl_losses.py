"""Policy losses, KL estimators and per-task objectives against a float64 NumPy reference written
token by token here, plus padding inertness, finite differences through the logits, and recombination."""

import contextlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtgrpo_jax.rl import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    per_task_objective,
    policy_loss,
    recombine_task_objectives,
    token_logprobs_from_logits,
)

EPS_LOW, EPS_HIGH = 0.2, 0.28


def ref_loss_and_grad(
    logp,
    old,
    adv,
    mask,
    *,
    aggregation,
    max_length=None,
    ref=None,
    beta=0.0,
    kl=None,
    dual_clip=None,
    entropy=None,
    entropy_coef=0.0,
):
    """Loss and d loss / d logp, one token at a time, in float64."""
    n, t = logp.shape
    max_length = t if max_length is None else max_length
    tok_loss = np.zeros((n, t))
    tok_grad = np.zeros((n, t))
    for i, j in itertools.product(range(n), range(t)):
        if not mask[i, j]:
            continue
        a = adv[i]
        r = np.exp(logp[i, j] - old[i, j])
        unclipped, clipped = -a * r, -a * min(max(r, 1 - EPS_LOW), 1 + EPS_HIGH)
        loss, grad = (unclipped, -a * r) if unclipped >= clipped else (clipped, 0.0)
        if dual_clip is not None and a < 0 and -a * dual_clip < loss:
            loss, grad = -a * dual_clip, 0.0
        if ref is not None:
            d = logp[i, j] - ref[i, j]
            value, slope = {"k1": (d, 1.0), "k2": (0.5 * d * d, d), "k3": (np.exp(-d) + d - 1, 1 - np.exp(-d))}[kl]
            loss, grad = loss + beta * value, grad + beta * slope
        if entropy is not None:
            loss -= entropy_coef * entropy[i, j]
        tok_loss[i, j], tok_grad[i, j] = loss, grad
    tokens = mask.sum(1)
    rows = [i for i in range(n) if tokens[i] > 0]
    weight = np.zeros((n, t))
    for i in rows:
        if aggregation == "token-mean":
            weight[i] = mask[i] / mask.sum()
        elif aggregation == "seq-mean-token-mean":
            weight[i] = mask[i] / (tokens[i] * len(rows))
        else:
            weight[i] = mask[i] / (max_length * len(rows))
    return (weight * tok_loss).sum(), weight * tok_grad


def make_batch(seed, n=6, t=9):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.05, 3.0, size=(n, t))
    old = logp + rng.normal(0, 0.35, size=(n, t))  # ratios ~ 0.5 .. 2: both clips active
    adv = rng.normal(size=n)
    adv[1] = 0.0
    mask = rng.uniform(size=(n, t)) < 0.75
    mask[:, 0] = True
    mask[-1] = False  # a padding row
    ref = logp + rng.normal(0, 0.25, size=(n, t))
    entropy = rng.uniform(0, 3, size=(n, t))
    return dict(logp=logp, old=old, adv=adv, mask=mask, ref=ref, entropy=entropy)


def _ctx(precision):
    return jax.enable_x64(True) if precision == "float64" else contextlib.nullcontext()


CASES = [(agg, kl, dual) for agg in AGGREGATIONS for kl in (None,) + KL_ESTIMATORS for dual in (None, 3.0)]


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_policy_loss_matches_numpy_reference(precision):
    """Every aggregation x KL estimator (or none) x dual clip, loss and gradient w.r.t. logp."""
    b = make_batch(0)
    rtol = 1e-6 if precision == "float64" else 1e-5
    with _ctx(precision):

        @jax.jit
        def all_cases(logp, old, adv, mask, ref, entropy):
            # One program for every case: one compilation instead of 24.
            out = []
            for agg, kl, dual in CASES:

                def f(lp, agg=agg, kl=kl, dual=dual):
                    return policy_loss(
                        lp,
                        old,
                        adv,
                        mask,
                        eps_low=EPS_LOW,
                        eps_high=EPS_HIGH,
                        aggregation=agg,
                        max_length=12 if agg.endswith("norm") else None,
                        ref_logp=None if kl is None else ref,
                        beta=0.0 if kl is None else 0.1,
                        kl_estimator=kl or "k3",
                        dual_clip=dual,
                        entropy=entropy,
                        entropy_coef=0.01,
                    )[0]

                out.append(jax.value_and_grad(f)(logp))
            return out

        arrays = (
            [jnp.asarray(b[k], precision) for k in ("logp", "old", "adv")]
            + [jnp.asarray(b["mask"])]
            + [jnp.asarray(b[k], precision) for k in ("ref", "entropy")]
        )
        for (agg, kl, dual), (loss, grad) in zip(CASES, all_cases(*arrays)):
            assert loss.dtype == jnp.dtype(precision) and grad.dtype == jnp.dtype(precision)
            exp_loss, exp_grad = ref_loss_and_grad(
                b["logp"],
                b["old"],
                b["adv"],
                b["mask"],
                aggregation=agg,
                max_length=12 if agg.endswith("norm") else None,
                ref=None if kl is None else b["ref"],
                beta=0.0 if kl is None else 0.1,
                kl=kl,
                dual_clip=dual,
                entropy=b["entropy"],
                entropy_coef=0.01,
            )
            case = f"{agg}/{kl}/{dual}"
            np.testing.assert_allclose(float(loss), exp_loss, rtol=rtol, err_msg=case)
            np.testing.assert_allclose(
                np.asarray(grad), exp_grad, rtol=rtol, atol=rtol * np.abs(exp_grad).max(), err_msg=case
            )
            assert np.all(np.asarray(grad)[~b["mask"]] == 0.0), case


def test_metrics_match_numpy():
    b = make_batch(1)
    loss, m = jax.jit(
        lambda *a: policy_loss(
            *a,
            eps_low=EPS_LOW,
            eps_high=EPS_HIGH,
            aggregation="token-mean",
            ref_logp=jnp.asarray(b["ref"], jnp.float32),
            beta=0.05,
            dual_clip=1.5,
            entropy=jnp.asarray(b["entropy"], jnp.float32),
            entropy_coef=0.02,
        )
    )(*(jnp.asarray(b[k], jnp.float32) for k in ("logp", "old", "adv")), jnp.asarray(b["mask"]))
    mask = b["mask"]
    r = np.exp(b["logp"] - b["old"])[mask]
    a = np.broadcast_to(b["adv"][:, None], mask.shape)[mask]
    np.testing.assert_allclose(m["clip_frac_low"], np.mean((a < 0) & (r < 1 - EPS_LOW)), rtol=1e-6)
    np.testing.assert_allclose(m["clip_frac_high"], np.mean((a > 0) & (r > 1 + EPS_HIGH)), rtol=1e-6)
    np.testing.assert_allclose(m["dual_clip_frac"], np.mean((a < 0) & (r > 1.5)), rtol=1e-6)
    assert 0 < m["clip_frac_low"] < 1 and 0 < m["clip_frac_high"] < 1 and m["dual_clip_frac"] > 0
    np.testing.assert_allclose(m["approx_kl"], np.mean(r - 1 - np.log(r)), rtol=1e-5)
    np.testing.assert_allclose(
        [m["ratio_mean"], m["ratio_min"], m["ratio_max"]], [r.mean(), r.min(), r.max()], rtol=1e-6
    )
    assert m["num_tokens"] == mask.sum()
    np.testing.assert_allclose(m["entropy"], b["entropy"][mask].mean(), rtol=1e-6)
    d = (b["logp"] - b["ref"])[mask]
    np.testing.assert_allclose(m["kl"], np.mean(np.exp(-d) + d - 1), rtol=1e-5)
    # the loss decomposes into its reported parts
    np.testing.assert_allclose(loss, m["pg_loss"] + 0.05 * m["kl"] - 0.02 * m["entropy"], rtol=1e-6)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_padding_is_inert(aggregation):
    """Padded tokens: gradient exactly 0, and any values there (even inf / NaN) change nothing."""
    b = make_batch(2)
    mask = jnp.asarray(b["mask"])
    kwargs = dict(
        eps_low=EPS_LOW,
        eps_high=EPS_HIGH,
        aggregation=aggregation,
        beta=0.1,
        kl_estimator="k3",
        dual_clip=3.0,
        entropy_coef=0.01,
    )

    @jax.jit
    def run(logp, old, adv, ref, ent):
        f = lambda lp, o, r, e: policy_loss(lp, o, adv, mask, ref_logp=r, entropy=e, **kwargs)  # noqa: E731
        (loss, metrics), grads = jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)(logp, old, ref, ent)
        return loss, metrics, grads

    base = [jnp.asarray(b[k], jnp.float32) for k in ("logp", "old", "adv", "ref", "entropy")]
    loss0, metrics0, grads0 = run(*base)
    for g in grads0:
        assert np.all(np.asarray(g)[~b["mask"]] == 0.0)
    rng = np.random.default_rng(0)
    for garbage in (1e4, -1e4, np.inf, np.nan):
        poisoned = []
        for x in base[:2] + base[3:]:
            x = np.asarray(x).copy()
            x[~b["mask"]] = garbage * rng.uniform(0.5, 2.0, size=(~b["mask"]).sum())
            poisoned.append(jnp.asarray(x))
        adv = np.asarray(base[2]).copy()
        adv[-1] = garbage  # the advantage of the all-padding row
        loss, metrics, grads = run(poisoned[0], poisoned[1], jnp.asarray(adv), poisoned[2], poisoned[3])
        assert loss == loss0
        assert jax.tree.all(jax.tree.map(lambda x, y: bool(x == y), metrics, metrics0))
        for g, g0 in zip(grads, grads0):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(g0))


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_gradient_wrt_logits_matches_finite_differences(chunk_size):
    """d loss / d logits through token logprobs + entropy (temperature 0.7), central differences, float64."""
    rng = np.random.default_rng(4)
    n, t, v = 3, 4, 11
    tokens = rng.integers(0, v, size=(n, t))
    mask = np.ones((n, t), bool)
    mask[0, 3] = mask[2, 2:] = False
    with jax.enable_x64(True):
        logits = jnp.asarray(rng.normal(0, 1.5, size=(n, t, v)))
        old = token_logprobs_from_logits(logits, tokens, 0.7) + jnp.asarray(rng.normal(0, 0.3, size=(n, t)))
        ref = old + jnp.asarray(rng.normal(0, 0.2, size=(n, t)))
        adv = jnp.asarray(rng.normal(size=n))

        @jax.jit
        def f(x):
            lp, ent = token_logprobs_from_logits(x, tokens, 0.7, chunk_size=chunk_size, return_entropy=True)
            return policy_loss(
                lp,
                old,
                adv,
                mask,
                eps_low=EPS_LOW,
                eps_high=EPS_HIGH,
                aggregation="seq-mean-token-mean",
                ref_logp=ref,
                beta=0.1,
                kl_estimator="k3",
                entropy=ent,
                entropy_coef=0.05,
            )[0]

        grad = np.asarray(jax.jit(jax.grad(f))(logits))
        x0 = np.asarray(logits)
        h = 1e-6
        fd = np.zeros_like(x0)
        for idx in np.ndindex(x0.shape):
            e = np.zeros_like(x0)
            e[idx] = h
            fd[idx] = (float(f(jnp.asarray(x0 + e))) - float(f(jnp.asarray(x0 - e)))) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-7 * np.abs(fd).max())
    assert np.all(grad[~mask] == 0.0)  # padded positions' logits get nothing
    assert np.abs(grad).max() > 1e-3


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_per_task_objectives_recombine(aggregation):
    b = make_batch(5, n=12, t=7)
    b["mask"][-1] = False
    task_ids = np.array([0, 2, 1, 0, 2, 2, 0, 1, 2, 0, 3, -1])  # task 3 has one row; -1 is padding
    kwargs = dict(
        eps_low=EPS_LOW,
        eps_high=EPS_HIGH,
        aggregation=aggregation,
        beta=0.05,
        dual_clip=2.0,
        entropy_coef=0.01,
        max_length=10,
    )
    arrays = {k: jnp.asarray(v, jnp.float32) for k, v in b.items() if k != "mask"}
    mask = jnp.asarray(b["mask"])

    @jax.jit
    def both(logp, old, adv, ref, ent, ids):
        full, _ = policy_loss(logp, old, adv, mask, ref_logp=ref, entropy=ent, **kwargs)
        per = per_task_objective(logp, old, adv, mask, ids, 5, ref_logp=ref, entropy=ent, **kwargs)
        return full, per

    full, per = both(
        arrays["logp"], arrays["old"], arrays["adv"], arrays["ref"], arrays["entropy"], jnp.asarray(task_ids)
    )
    assert per.objective.shape == per.count.shape == (5,)
    np.testing.assert_allclose(recombine_task_objectives(per.objective, per.count), -full, rtol=1e-6)
    assert per.objective[4] == 0 and per.count[4] == 0  # a task absent from the batch
    expected_count = [
        (b["mask"][task_ids == k].sum() if aggregation == "token-mean" else (b["mask"][task_ids == k].sum(1) > 0).sum())
        for k in range(5)
    ]
    np.testing.assert_array_equal(per.count, expected_count)
    for k in range(4):  # J_k is exactly the negated loss of task k's rows alone (rows of other tasks masked)
        rows = jnp.asarray(task_ids == k)[:, None]
        sub = jax.jit(
            lambda a: policy_loss(
                a["logp"], a["old"], a["adv"], mask & rows, ref_logp=a["ref"], entropy=a["entropy"], **kwargs
            )[0]
        )(arrays)
        np.testing.assert_allclose(per.objective[k], -sub, rtol=1e-6)


def test_validation_errors():
    b = make_batch(6)
    lp, old, adv, mask = (jnp.asarray(b[k]) for k in ("logp", "old", "adv", "mask"))
    kw = dict(eps_low=0.2, eps_high=0.28)
    with pytest.raises(ValueError, match="aggregation='mean'"):
        policy_loss(lp, old, adv, mask, aggregation="mean", **kw)
    with pytest.raises(ValueError, match="kl_estimator='k4'"):
        policy_loss(lp, old, adv, mask, ref_logp=old, beta=0.1, kl_estimator="k4", **kw)
    with pytest.raises(ValueError, match="needs ref_logp"):
        policy_loss(lp, old, adv, mask, beta=0.1, **kw)
    with pytest.raises(ValueError, match="needs the per-token entropy"):
        policy_loss(lp, old, adv, mask, entropy_coef=0.1, **kw)
    with pytest.raises(ValueError, match="old_logp must have the shape"):
        policy_loss(lp, old[:, :-1], adv, mask, **kw)
    with pytest.raises(ValueError, match=r"advantages must be \[N\]"):
        policy_loss(lp, old, adv[:-1], mask, **kw)
    with pytest.raises(ValueError, match="dual_clip=0.5"):
        policy_loss(lp, old, adv, mask, dual_clip=0.5, **kw)
    with pytest.raises(ValueError, match="eps_low=1.5"):
        policy_loss(lp, old, adv, mask, eps_low=1.5, eps_high=0.2)
    with pytest.raises(ValueError, match="max_length=0"):
        policy_loss(lp, old, adv, mask, aggregation="seq-mean-token-sum-norm", max_length=0, **kw)
    with pytest.raises(ValueError, match="task_ids must be integers"):
        per_task_objective(lp, old, adv, mask, jnp.zeros(adv.shape), 2, **kw)
    with pytest.raises(ValueError, match="num_tasks"):
        per_task_objective(lp, old, adv, mask, jnp.zeros(adv.shape, int), 0, **kw)


def test_empty_batch_is_finite():
    z = jnp.zeros((3, 4))
    loss, m = policy_loss(z, z, jnp.ones(3), jnp.zeros((3, 4), bool), eps_low=0.2, eps_high=0.2)
    assert loss == 0.0 and all(np.isfinite(float(v)) for v in m.values())
