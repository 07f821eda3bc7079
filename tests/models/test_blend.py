"""The blend family (models/blend.py): z-scored ∞-AE and EASE scores mixed by one weight, checked
against a dense float64 reference written from the specification, and its weight chosen on
validation alone."""

import math

import numpy as np
import pytest
import scipy.sparse as sp

from models.baselines import EASE, ease_weights
from models.blend import Blend, check_weights, select_weight, zscore_rows
from models.infinite_ae import EvalSet, fit_select
from models.kernels import NTKConfig
from models.metrics import evaluate_scores, propensity_weights


def _data(seed=0, users=60, items=40, density=0.15):
    rng = np.random.default_rng(seed)
    taste = rng.random((users, 3)) @ rng.random((3, items))
    x = (rng.random((users, items)) < density * taste / taste.mean()).astype(np.float32)
    val = ((rng.random((users, items)) < 0.05) & (x == 0)).astype(np.float32)
    val[np.arange(users), (np.arange(users) * 7) % items] = 1.0  # every user has a target
    val[x > 0] = 0.0
    return x, val


def _ntk64(a, b, depth, w_std, b_std):
    """The closed-form NTK of ../shared/docs/algorithms.md, float64 (arccos form)."""
    d = a.shape[1]
    w2, b2 = w_std**2, b_std**2
    sigma = w2 * (a @ b.T) / d + b2
    qa = w2 * (a * a).sum(1) / d + b2
    qb = w2 * (b * b).sum(1) / d + b2
    theta = sigma.copy()
    for _ in range(depth):
        s = np.sqrt(np.outer(qa, qb))
        t = np.arccos(np.clip(sigma / s, -1, 1))
        sigma_new = w2 * s * (np.sin(t) + (np.pi - t) * np.cos(t)) / (2 * np.pi) + b2
        theta = sigma_new + w2 * theta * (np.pi - t) / (2 * np.pi)
        sigma = sigma_new
        qa, qb = w2 * qa / 2 + b2, w2 * qb / 2 + b2
    return theta


def _dense_blend(x, h, lam, ease_lam, weight, config):
    """The blend computed densely in float64 from the definitions."""
    x64, h64 = x.astype(np.float64), h.astype(np.float64)
    k = _ntk64(x64, x64, config.depth, config.w_std, config.b_std)
    lam_t = lam * np.trace(k) / k.shape[0]
    alpha = np.linalg.solve(k + lam_t * np.eye(len(k)), x64)
    a = _ntk64(h64, x64, config.depth, config.w_std, config.b_std) @ alpha
    g = x64.T @ x64 + ease_lam * np.eye(x.shape[1])
    p = np.linalg.inv(g)
    bmat = -p / np.diag(p)[None, :]
    np.fill_diagonal(bmat, 0.0)
    e = h64 @ bmat

    def z(s):
        sd = s.std(axis=1, keepdims=True)
        return (s - s.mean(axis=1, keepdims=True)) / np.where(sd == 0, 1.0, sd)

    return (1 - weight) * z(a) + weight * z(e)


def _models(x, val_targets, config, lam_grid=(1.0,), ease_lam=20.0):
    val = EvalSet(context=sp.csr_matrix(x), targets=sp.csr_matrix(val_targets),
                  weights=propensity_weights(x.sum(0), int(x.sum())), seen=sp.csr_matrix(x))
    infae, _ = fit_select(x, val, lam_grid, config, select_metric="ndcg@10")
    ease = EASE(weights=ease_weights(x.T @ x, ease_lam), lam=ease_lam)
    return infae, ease, val


@pytest.mark.parametrize("config", [NTKConfig(), NTKConfig(depth=2, w_std=1.2, b_std=0.8)])
@pytest.mark.parametrize("weight", [0.0, 0.35, 1.0])
def test_blend_scores_equal_the_dense_reference(config, weight):
    x, val_targets = _data()
    infae, ease, _ = _models(x, val_targets, config)
    blend = Blend(a=infae, b=ease, weight=weight)
    h = x[:25].copy()
    h[:, :3] = 1.0  # histories other than the support rows
    ref = _dense_blend(x, h, infae.lam, ease.lam, weight, config)
    got = blend.scores(sp.csr_matrix(h))
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3)
    # batched scoring and top-k agree with the reference's order (seen items excluded)
    batched = np.concatenate([s for _, s in blend.iter_scores(sp.csr_matrix(h), batch_size=16)])
    np.testing.assert_allclose(batched, got, rtol=1e-5, atol=1e-5)
    top, _ = blend.recommend(sp.csr_matrix(h), k=5)
    masked = np.where(h > 0, -np.inf, ref)
    for r in range(h.shape[0]):
        assert not set(top[r]) & set(np.flatnonzero(h[r]))
        np.testing.assert_allclose(np.sort(masked[r, top[r]]), np.sort(np.sort(masked[r])[-5:]),
                                   rtol=2e-3, atol=2e-3)


def test_zscore_rows_standardises_and_keeps_constant_rows_finite():
    s = np.array([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]], dtype=np.float32)
    z = zscore_rows(s)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z[0].mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(z[0].std(), 1.0, atol=1e-6)
    np.testing.assert_array_equal(z[1], np.zeros(4, dtype=np.float32))


def test_weight_is_the_brute_force_best_on_validation():
    x, val_targets = _data(seed=1)
    config = NTKConfig()
    infae, ease, val = _models(x, val_targets, config, lam_grid=(5.0,))
    grid = [0.0, 0.25, 0.5, 0.75, 1.0]
    sa = infae.scores(val.context)
    (_, sb), = list(ease.iter_scores(val.context))
    pairs = [(0, sa[:30], sb[:30]), (30, sa[30:], sb[30:])]  # two batches
    weight, path = select_weight(iter(pairs), val, grid, "ndcg@10")
    brute = []
    for w in grid:
        dense = Blend(a=infae, b=ease, weight=w).scores(val.context)
        brute.append(evaluate_scores(dense, val.targets, val.seen, val.weights)["ndcg@10"])
    assert [p["weight"] for p in path] == grid
    np.testing.assert_allclose([p["val"]["ndcg@10"] for p in path], brute, rtol=1e-6)
    best = max(brute)
    assert weight == grid[next(i for i, v in enumerate(brute) if v == best)]


def test_weights_outside_zero_one_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_weights([0.5, 1.5])
    with pytest.raises(ValueError, match="empty"):
        check_weights([])
    assert not math.isnan(check_weights([0.0, 1.0])[1])
