"""Distill-CF on small synthetic data: learning, determinism, the custom VJP, memory, pieces."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp

from models.distill_cf import (
    DistillConfig,
    adam_init,
    cholesky_solve,
    distill,
    draw_seeds,
    frechet_noise,
    hash_uniform,
    make_multi_gumbel_fn,
    make_step_fn,
    naive_multi_gumbel,
    ntk_fn,
    softmax_cross_entropy,
)
from models.infinite_ae import EvalSet
from models.kernels import NTKConfig, ntk_from_dots
from models.metrics import propensity_weights
from models.samplers import head_user_indices, head_users, random_user_indices, random_users

FAST = dict(budget=20, samples=50, max_steps=40, eval_steps=(), eval_every=20, patience=100)


def low_rank_data(n_users: int = 400, n_items: int = 300, rank: int = 4, seed: int = 0):
    """A binary user × item matrix from low-rank tastes plus popularity, split 80/20 train/val."""
    rng = np.random.default_rng(seed)
    users = rng.standard_normal((n_users, rank))
    items = rng.standard_normal((n_items, rank))
    popularity = -0.8 * np.log(np.arange(1, n_items + 1))[rng.permutation(n_items)]
    logits = 1.5 * users @ items.T / np.sqrt(rank) + popularity
    threshold = np.quantile(logits, 0.92, axis=1, keepdims=True)
    full = (logits + 0.3 * rng.standard_normal(logits.shape)) > threshold
    held_out = (rng.random(full.shape) < 0.2) & full
    train = sp.csr_matrix((full & ~held_out).astype(np.float32))
    val = sp.csr_matrix(held_out.astype(np.float32))
    weights = propensity_weights(np.asarray(train.sum(axis=0)).ravel(), train.nnz)
    return train, EvalSet(context=train, targets=val, weights=weights)


@pytest.fixture(scope="module")
def data():
    return low_rank_data()


@pytest.fixture(scope="module")
def result(data):
    train, val = data
    return distill(train, val, DistillConfig(**FAST, seed=3))


# -- behaviour ---------------------------------------------------------------------------------
def test_loss_decreases(data):
    train, _ = data
    config = DistillConfig(**FAST)
    counts = np.diff(train.indptr).astype(np.float32)
    step_fn, _ = make_step_fn(train.shape[1], train.nnz / train.shape[0], config)
    state = adam_init(jnp.asarray(random_users(train, config.budget, 0)))
    targets, targets_sq = jnp.asarray(train.toarray()), jnp.asarray(counts)
    losses = []
    for step in range(30):
        state, loss = step_fn(state, jax.random.key(step), jnp.float32(0.1), targets, targets_sq)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
    assert np.mean(np.diff(losses) < 0) > 0.8, losses  # fresh noise every step, still downhill


def test_summary_beats_its_random_user_initialisation(result):
    assert result.best_val["hr@100"] > result.init_val["hr@100"] + 2.0
    assert result.best_val["ndcg@10"] > result.init_val["ndcg@10"]


def test_result_shape_range_and_history(result, data):
    train, _ = data
    summary = result.summary
    assert summary.shape == (20, train.shape[1]) and summary.dtype == np.float32
    assert summary.min() >= 0.0 and summary.max() <= 1.0
    assert result.best_step in (20, 40) and result.steps_run == 40
    assert [h["step"] for h in result.history] == list(range(41))
    assert [h["step"] for h in result.history if h["evaluated"]] == [0, 20, 40]
    assert result.best_lambda in DistillConfig().lambdas
    best_record = result.history[result.best_step]
    assert best_record["val_hr@100"] == pytest.approx(result.best_val["hr@100"])
    assert np.array_equal(result.init_users, random_user_indices(train, 20, 3))


def test_same_seed_same_summary(data, result):
    train, val = data
    again = distill(train, val, DistillConfig(**FAST, seed=3))
    assert np.array_equal(again.summary, result.summary)
    assert again.best_step == result.best_step and again.best_lambda == result.best_lambda
    other = distill(train, val, DistillConfig(**{**FAST, "max_steps": 20}, seed=4))
    assert not np.array_equal(other.summary, result.summary)


def test_early_stop_and_on_step(data):
    train, val = data
    seen = []
    # patience 1: the first evaluation that does not improve on the best stops the run
    config = DistillConfig(**{**FAST, "max_steps": 200, "eval_every": 5, "patience": 1})
    res = distill(train, val, config, on_step=seen.append)
    assert res.steps_run < 200
    assert res.history[-1]["evaluated"] and res.steps_run - res.best_step >= 1
    assert [i["step"] for i in seen] == list(range(res.steps_run + 1))
    assert {"step", "loss", "seconds", "evaluated", "val_hr@100", "last_val_hr@100",
            "best_val_hr@100", "best_step", "lambda"} <= set(seen[-1])


def test_eval_schedule():
    config = DistillConfig()
    steps = [s for s in range(1, 301) if config.is_eval_step(s)]
    assert steps == [25, 40, 50, 75, 80, 100, 120, 125, 150, 160, 175, 200, 240, 280]


# -- the custom VJP ------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", ["hash", "jax"])
def test_custom_vjp_matches_naive_autodiff(noise):
    rng = np.random.default_rng(1)
    x_raw = jnp.asarray(rng.standard_normal((6, 25)).astype(np.float32))
    weights = jnp.asarray(rng.standard_normal((6, 25)).astype(np.float32))
    seeds = draw_seeds(jax.random.key(5), 7, noise)
    tau = 2.0
    multi_gumbel_fn = make_multi_gumbel_fn(tau, noise)

    def objective(sum_fn):
        return lambda x: jnp.sum(weights * jnp.tanh(jax.nn.hard_tanh(sum_fn(x))))

    fast = objective(lambda x: multi_gumbel_fn(x, seeds))
    naive = objective(lambda x: naive_multi_gumbel(x, seeds, tau, noise))
    np.testing.assert_allclose(multi_gumbel_fn(x_raw, seeds),
                               naive_multi_gumbel(x_raw, seeds, tau, noise), rtol=1e-5, atol=1e-6)
    grad_fast, grad_naive = jax.grad(fast)(x_raw), jax.grad(naive)(x_raw)
    assert float(jnp.max(jnp.abs(grad_naive))) > 1e-2  # a gradient worth comparing
    np.testing.assert_allclose(grad_fast, grad_naive, atol=1e-5, rtol=0)


def _temp_bytes(fn, *args) -> int:
    return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


def test_memory_does_not_grow_with_samples():
    """XLA's compiled buffer plan: the scan keeps O(μ·m) temporaries (+ S·μ normalisers)."""
    budget, n_items = 64, 256
    x_raw = jnp.zeros((budget, n_items), jnp.float32)
    weights = jnp.ones((budget, n_items), jnp.float32)
    custom, naive = {}, {}
    for samples in (10, 200):
        seeds = draw_seeds(jax.random.key(0), samples)
        multi_gumbel_fn = make_multi_gumbel_fn(2.0)

        def grad_fn(sum_fn):
            return lambda x, s: jax.grad(
                lambda v: jnp.sum(weights * jax.nn.hard_tanh(sum_fn(v, s))))(x)

        custom[samples] = _temp_bytes(grad_fn(multi_gumbel_fn), x_raw, seeds)
        naive_fn = grad_fn(lambda v, s: naive_multi_gumbel(v, s, 2.0))
        naive[samples] = _temp_bytes(naive_fn, x_raw, seeds)
    normalisers = (200 - 10) * budget * 4
    assert custom[200] <= custom[10] + 2 * normalisers
    assert custom[200] < 1.25 * custom[10]
    assert naive[200] > 10 * naive[10]  # the measure does see S copies when they exist
    assert custom[200] < naive[200] / 20


# -- pieces ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_ntk_fn_equals_closed_form_kernel(depth):
    rng = np.random.default_rng(depth)
    x = (rng.random((30, 50)) < 0.3).astype(np.float32)
    y = rng.random((9, 50)).astype(np.float32)
    config = NTKConfig(depth=depth)
    expected = ntk_from_dots(x @ y.T, (x * x).sum(1), (y * y).sum(1), 50, config)
    got = ntk_fn(jnp.asarray(x @ y.T), jnp.asarray((x * x).sum(1)), jnp.asarray((y * y).sum(1)),
                 50, config)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)


def test_ntk_fn_gradient_is_finite_on_the_diagonal():
    y = jnp.asarray(np.random.default_rng(0).random((8, 40)).astype(np.float32))

    def total(v):
        sq = jnp.sum(v * v, axis=1)
        return jnp.sum(ntk_fn(v @ v.T, sq, sq, 40))

    assert bool(jnp.all(jnp.isfinite(jax.grad(total)(y))))


def test_softmax_cross_entropy_matches_log_softmax():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.standard_normal((12, 30)).astype(np.float32) * 3)
    targets = jnp.asarray((rng.random((12, 30)) < 0.2).astype(np.float32))
    counts = jnp.sum(targets, axis=1)

    def reference(z):
        return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(z, axis=-1), axis=-1))

    loss = float(softmax_cross_entropy(logits, targets, counts))
    assert loss == pytest.approx(float(reference(logits)), rel=1e-5)
    grad = jax.grad(lambda z: softmax_cross_entropy(z, targets, counts))(logits)
    np.testing.assert_allclose(grad, jax.grad(reference)(logits), atol=1e-6)


def test_cholesky_solve():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((40, 40))
    a = (a @ a.T + 40 * np.eye(40)).astype(np.float32)
    b = rng.standard_normal((40, 70)).astype(np.float32)
    np.testing.assert_allclose(cholesky_solve(jnp.asarray(a), jnp.asarray(b)),
                               np.linalg.solve(a, b), rtol=1e-4, atol=1e-5)


def test_noise_is_uniform_gumbel_and_deterministic():
    seed_pair = jnp.asarray([123, 456], jnp.uint32)
    u = np.asarray(hash_uniform(seed_pair, (200, 500)), dtype=np.float64)
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.003 and abs(u.var() - 1 / 12) < 0.002
    counts, _ = np.histogram(u, bins=20, range=(0, 1))
    assert counts.min() > 0.95 * counts.mean()
    assert np.array_equal(u, np.asarray(hash_uniform(seed_pair, (200, 500)), dtype=np.float64))
    other_pair = jnp.asarray([123, 457], jnp.uint32)
    other = np.asarray(hash_uniform(other_pair, (200, 500)), dtype=np.float64)
    assert abs(np.corrcoef(u.ravel(), other.ravel())[0, 1]) < 0.01
    gumbel = -np.log(-np.log(u))
    assert abs(gumbel.mean() - 0.5772) < 0.01
    # (−ln u)^(−1/τ) to float32 accuracy, tails included
    tails = jnp.asarray([0.5 / 2**23, 1.5 / 2**23, 1 - 0.5 / 2**23, 0.25, 0.5, 0.75], jnp.float32)
    exact = (-np.log(np.asarray(tails, np.float64))) ** (-1 / 10.0)
    np.testing.assert_allclose(np.asarray(frechet_noise(tails, 10.0)), exact, rtol=5e-7)


def test_config_validation():
    with pytest.raises(ValueError):
        DistillConfig(noise="nope")
    with pytest.raises(ValueError):
        DistillConfig(tau=0.0)
    with pytest.raises(ValueError):
        DistillConfig(budget=0)


# -- samplers ----------------------------------------------------------------------------------
def test_random_users_are_distinct_seeded_and_active():
    rows = [[1, 0, 1], [0, 0, 0], [0, 1, 0], [1, 1, 1], [0, 0, 1]]
    train = sp.csr_matrix(np.array(rows, dtype=np.float32))
    picks = random_user_indices(train, 3, seed=0)
    assert len(set(picks.tolist())) == 3 and 1 not in picks
    assert np.array_equal(picks, random_user_indices(train, 3, seed=0))
    rows = random_users(train, 3, seed=0)
    assert rows.dtype == np.float32 and np.array_equal(rows, train[picks].toarray())
    with pytest.raises(ValueError):
        random_users(train, 5, seed=0)  # only 4 users have train rows


def test_head_users_most_active_first_ties_by_index():
    rows = [[1, 0, 0], [1, 1, 0], [0, 1, 1], [1, 1, 1], [0, 0, 0]]
    train = sp.csr_matrix(np.array(rows, dtype=np.float32))
    assert head_user_indices(train, 3).tolist() == [3, 1, 2]
    np.testing.assert_array_equal(head_users(train, 2), train[[3, 1]].toarray())
