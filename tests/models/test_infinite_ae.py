"""∞-AE behaviour: closed-form fit, the λ path, masking, batching, singular supports."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from models.baselines import EASE, PopRec, ease_weights, fit_ease_select
from models.infinite_ae import (
    EvalSet,
    InfAE,
    SingularKernelWarning,
    evaluate,
    evaluate_score_batches,
    fit_select,
    kernel_matrix,
    scaled_lambda,
    solve_alpha,
)
from models.kernels import NTKConfig, ntk_kernel_fn
from models.metrics import propensity_weights


def low_rank_data(seed=0, n=120, m=60, rank=3):
    """Users drawn from a few taste groups, split into train / val targets."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(n, rank))
    v = rng.normal(size=(m, rank))
    prob = 1 / (1 + np.exp(-(u @ v.T) * 2 + 2.0))
    full = rng.random((n, m)) < prob
    full[np.arange(n), rng.integers(0, m, n)] = True
    hold = (rng.random((n, m)) < 0.2) & full
    train = sp.csr_matrix((full & ~hold).astype(np.float32))
    val = sp.csr_matrix(hold.astype(np.float32))
    w = propensity_weights(np.asarray(train.sum(0)).ravel(), train.nnz)
    return train, val, w


def test_alpha_solves_the_ridge_system():
    train, _, _ = low_rank_data()
    x = train.toarray()
    k = kernel_matrix(x)
    np.testing.assert_allclose(k, ntk_kernel_fn()(x), rtol=1e-6)
    alpha, lam_s = solve_alpha(k, x, 5.0)
    assert lam_s == pytest.approx(5.0 * np.trace(k) / k.shape[0], rel=1e-6)
    resid = (k.astype(np.float64) + lam_s * np.eye(len(k))) @ alpha - x
    assert np.abs(resid).max() < 1e-3


def test_support_shortcut_equals_explicit_kernel_scores():
    """Validation through K α = X − λ̃α gives exactly the λ path of explicit scoring."""
    train, val, w = low_rank_data(1)
    ev = EvalSet(context=train, targets=val, weights=w,
                 negatives=np.tile(np.arange(5), (train.shape[0], 1)))
    fast_model, fast = fit_select(train, ev, [0.5, 5, 50], support_is_val_context=True,
                                  select_metric="hr@100")
    slow_model, slow = fit_select(train, ev, [0.5, 5, 50], support_is_val_context=False,
                                  select_metric="hr@100")
    assert fast_model.lam == slow_model.lam
    for a, b in zip(fast, slow):
        for key in ("hr@10", "hr@100", "ndcg@10"):
            assert a.val[key] == pytest.approx(b.val[key], abs=1e-6)
        assert a.val["auc"] == pytest.approx(b.val["auc"], abs=1e-4)


def test_lambda_zero_kept_without_a_solve_is_solved_at_the_end():
    """λ = 0 is scored for free (K K⁻¹X = X); if it wins, its α is solved once, at the end."""
    train, _, w = low_rank_data(4, n=150, m=70)
    x = train.toarray()
    # each user's target: the lowest-index item they have not seen — λ = 0 ties every unseen item
    # at score 0 and breaks ties by index, so it ranks that target first: HR@10 = 100
    first_unseen = np.argmax(x == 0, axis=1)
    targets = sp.csr_matrix((np.ones(len(x), np.float32), (np.arange(len(x)), first_unseen)), shape=x.shape)
    ev = EvalSet(context=train, targets=targets, weights=w)
    model, path = fit_select(train, ev, [0.0, 1.0, 20.0], support_is_val_context=True,
                             select_metric="hr@10")
    assert [r.lam for r in path] == [0.0, 1.0, 20.0]
    assert path[0].val["hr@10"] == pytest.approx(100.0)
    assert max(r.val["hr@10"] for r in path[1:]) < 100.0
    assert model.lam == 0.0
    alpha, lam_s = solve_alpha(kernel_matrix(x), x, 0.0)
    np.testing.assert_allclose(model.alpha, alpha, rtol=1e-5, atol=1e-5 * np.abs(alpha).max())
    assert model.lam_scaled == lam_s == path[0].lam_scaled


def test_support_user_scores_from_the_gram_equal_direct_scores():
    """Test-time scoring of the support users (train + val context) through X Xᵀ is exact."""
    train, val, w = low_rank_data(5, n=130, m=50)
    x = train.toarray()
    model = InfAE(support=x, alpha=solve_alpha(kernel_matrix(x), x, 5.0)[0], lam=5.0,
                  lam_scaled=0.0)
    context = (train + val).tocsr()
    gram = x @ x.T
    direct = dict(model.iter_scores(context, batch_size=40))
    via_gram = dict(model.iter_scores_of_support_users(context, gram, batch_size=40))
    assert direct.keys() == via_gram.keys() == {0, 40, 80, 120}
    for start in direct:
        np.testing.assert_allclose(via_gram[start], direct[start], rtol=1e-5, atol=1e-6)
    ev = EvalSet(context=context, targets=val, weights=w)
    assert evaluate(model, ev, support_gram=gram) == pytest.approx(evaluate(model, ev), abs=1e-9)
    with pytest.raises(ValueError, match="support user"):
        next(model.iter_scores_of_support_users(context[:100], gram))
    with pytest.raises(ValueError, match="support_gram"):
        next(model.iter_scores_of_support_users(context, gram[:100]))


def test_beats_popularity_and_selects_best_lambda():
    train, val, w = low_rank_data(2, n=200, m=80)
    ev = EvalSet(context=train, targets=val, weights=w)
    model, path = fit_select(train, ev, [1, 5, 20, 100], support_is_val_context=True,
                             select_metric="hr@100")
    best = max(path, key=lambda r: r.val["hr@100"])
    assert model.lam == best.lam
    pop = evaluate_score_batches(PopRec.fit(train).iter_scores(train), ev)
    assert best.val["ndcg@10"] > pop["ndcg@10"] + 1.0


def test_recommend_masks_seen_and_batches_agree():
    train, _, _ = low_rank_data(3)
    x = train.toarray()
    alpha, lam_s = solve_alpha(kernel_matrix(x), x, 5.0)
    model = InfAE(support=x, alpha=alpha, lam=5.0, lam_scaled=lam_s)
    items_all, scores_all = model.recommend(train, k=10, batch_size=1000)
    items_b, scores_b = model.recommend(train, k=10, batch_size=7)
    np.testing.assert_array_equal(items_all, items_b)
    np.testing.assert_allclose(scores_all, scores_b, rtol=1e-5, atol=1e-6)
    assert not x[np.arange(len(x))[:, None], items_all].any()
    assert np.all(np.diff(scores_all, axis=1) <= 0)


def test_duplicate_rows_at_lambda_zero_warn_and_stay_finite():
    train, val, w = low_rank_data(4, n=60)
    dup = sp.vstack([train, train[:20]]).tocsr()
    dup_val = sp.vstack([val, val[:20]]).tocsr()
    ev = EvalSet(context=dup, targets=dup_val, weights=w)
    with pytest.warns(SingularKernelWarning):
        model, path = fit_select(dup, ev, [0.0, 1.0], support_is_val_context=False,
                                 select_metric="hr@100")
    assert path[0].stabilised and path[0].lam_scaled > 0
    k = kernel_matrix(dup)
    with pytest.warns(SingularKernelWarning):
        alpha, lam_s = solve_alpha(k, dup.toarray(), 0.0)
    assert lam_s > 0 and np.isfinite(alpha).all()
    assert all(np.isfinite(list(r.val.values())).all() for r in path)
    items, scores = model.recommend(dup[:5], k=5)
    assert np.isfinite(scores).all()


def test_depth_changes_the_kernel_but_fits_fine():
    train, val, w = low_rank_data(5)
    ev = EvalSet(context=train, targets=val, weights=w)
    m1, _ = fit_select(train, ev, [5], NTKConfig(depth=1), support_is_val_context=True,
                       select_metric="hr@100")
    m2, _ = fit_select(train, ev, [5], NTKConfig(depth=2), support_is_val_context=True,
                       select_metric="hr@100")
    assert not np.allclose(m1.alpha, m2.alpha)
    assert m2.config.depth == 2


def test_ease_closed_form_matches_definition():
    train, val, w = low_rank_data(6)
    x = train.toarray().astype(np.float64)
    g = x.T @ x
    b = ease_weights(g.astype(np.float32), 10.0)
    p = np.linalg.inv(g + 10 * np.eye(len(g)))
    want = -p / np.diag(p)
    np.fill_diagonal(want, 0)
    np.testing.assert_allclose(b, want, rtol=1e-4, atol=1e-6)
    assert np.all(np.diag(b) == 0)
    model, path = fit_ease_select(train, EvalSet(context=train, targets=val, weights=w), [1, 1000],
                                  select_metric="hr@100")
    assert isinstance(model, EASE) and len(path) == 2
    assert model.lam == max(path, key=lambda r: r["val"]["hr@100"])["lambda"]


def test_scaled_lambda_is_trace_normalised():
    k = np.diag([1.0, 3.0]).astype(np.float32)
    assert scaled_lambda(k, 2.0) == pytest.approx(4.0)


def test_evaluate_wrong_width_is_an_error():
    train, val, w = low_rank_data(7)
    x = train.toarray()
    alpha, lam_s = solve_alpha(kernel_matrix(x), x, 1.0)
    model = InfAE(support=x, alpha=alpha, lam=1.0, lam_scaled=lam_s)
    with pytest.raises(ValueError, match="items"):
        model.scores(np.ones((2, x.shape[1] + 1), np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert evaluate(model, EvalSet(context=train, targets=val, weights=w))["hr@10"] >= 0


def test_accelerator_code_path_gives_the_cpu_results(monkeypatch):
    """The GPU/TPU branch (JAX products with padded rows, JAX Cholesky) run here on JAX's CPU
    backend gives the same λ path, α and test metrics as the NumPy/SciPy branch."""
    import models.infinite_ae as ia
    import models.kernels as kernels

    train, val, w = low_rank_data(6, n=700, m=90)  # 700 rows: padded to 1024 on the JAX branch
    ev = EvalSet(context=train, targets=val, weights=w)
    cpu_model, cpu_path = fit_select(train, ev, [1, 5, 50], support_is_val_context=True,
                                     select_metric="hr@100")
    cpu_test = evaluate(cpu_model, ev, batch_size=300)
    monkeypatch.setattr(ia, "_accelerated", lambda: True)
    monkeypatch.setattr(kernels, "accelerated", lambda: True)
    acc_model, acc_path = fit_select(train, ev, [1, 5, 50], support_is_val_context=True,
                                     select_metric="hr@100")
    acc_test = evaluate(acc_model, ev, batch_size=300)
    assert acc_model.lam == cpu_model.lam
    np.testing.assert_allclose(acc_model.alpha, cpu_model.alpha, rtol=1e-4, atol=1e-4 * np.abs(cpu_model.alpha).max())
    for a, b in zip(acc_path, cpu_path):
        assert a.val["hr@100"] == pytest.approx(b.val["hr@100"], abs=1e-6)
    assert acc_test == pytest.approx(cpu_test, abs=1e-4)


@pytest.mark.parametrize("is_ctx", [True, False])
def test_path_metrics_hit_rate_only_keeps_the_choice_and_the_kept_metrics(is_ctx):
    """Ranking only what HR@100 needs for the λ not kept changes neither the choice nor any
    reported figure of the kept λ (its metrics are computed in full)."""
    train, val, w = low_rank_data(7, n=260, m=140)
    ev = EvalSet(context=train, targets=val, weights=w,
                 negatives=np.tile(np.arange(5), (train.shape[0], 1)))
    grid = [0.0, 1.0, 5.0, 50.0]
    full_model, full = fit_select(train, ev, grid, support_is_val_context=is_ctx,
                                  select_metric="hr@100")
    fast_model, fast = fit_select(train, ev, grid, support_is_val_context=is_ctx,
                                  path_metrics=("hr@100",), select_metric="hr@100")
    assert fast_model.lam == full_model.lam
    np.testing.assert_array_equal(fast_model.alpha, full_model.alpha)
    for a, b in zip(fast, full):
        assert a.val["hr@100"] == b.val["hr@100"]  # bit-identical: same top-100 sets
        if a.lam == fast_model.lam:
            assert a.val == b.val
        else:
            assert set(a.val) == {"hr@100"}


def test_hit_rate_only_evaluation_equals_the_full_one_with_ties():
    train, val, w = low_rank_data(8, n=90, m=150)  # m > 100: a real top-100 cut
    ev = EvalSet(context=train, targets=val, weights=w)
    x = train.toarray()
    tied = np.random.default_rng(0).integers(0, 3, x.shape).astype(np.float32)
    for scores in (x.copy(), tied):  # all unseen tied at 0; few distinct values
        full = evaluate_score_batches([(0, scores[:50].copy()), (50, scores[50:].copy())], ev)
        fast = evaluate_score_batches([(0, scores[:50].copy()), (50, scores[50:].copy())], ev,
                                      metrics=["hr@100"])
        assert fast == {"hr@100": full["hr@100"]}


@pytest.mark.parametrize("wanted", [["ndcg@10"], ["hr@10"], ["hr@10", "ndcg@10", "psp@10"],
                                    ["auc"], ["ndcg@10", "auc"], ["ndcg@100"], ["hr@100", "auc"],
                                    ["psp@100"]])
def test_reduced_evaluations_equal_the_full_one(wanted):
    """Asking for fewer metrics computes less, never different values (ties included)."""
    from models.infinite_ae import evaluation_plan

    train, val, w = low_rank_data(8, n=90, m=150)
    negatives = np.stack([np.random.default_rng(u).choice(150, 20, replace=False) for u in range(90)])
    ev = EvalSet(context=train, targets=val, weights=w, negatives=negatives)
    rng = np.random.default_rng(1)
    for scores in (train.toarray(), rng.integers(0, 3, (90, 150)).astype(np.float32),
                   rng.standard_normal((90, 150)).astype(np.float32)):
        batches = lambda: [(0, scores[:50].copy()), (50, scores[50:].copy())]  # noqa: E731
        full = evaluate_score_batches(batches(), ev)
        reduced = evaluate_score_batches(batches(), ev, metrics=wanted)
        assert reduced == {key: full[key] for key in wanted}
    assert evaluation_plan(["ndcg@10"]).ks == (10,) and not evaluation_plan(["ndcg@10"]).auc
    assert evaluation_plan(["hr@100"]).sort is False
    assert evaluation_plan(None) == evaluation_plan(["hr@10", "ndcg@100", "auc"])
    with pytest.raises(ValueError, match="cut-offs"):
        evaluation_plan(["ndcg@5"])


def test_fit_select_path_metrics_ndcg_keeps_every_figure():
    train, val, w = low_rank_data(7, n=260, m=140)
    ev = EvalSet(context=train, targets=val, weights=w,
                 negatives=np.tile(np.arange(5), (train.shape[0], 1)))
    grid = [0.0, 1.0, 5.0, 50.0]
    for is_ctx in (True, False):
        full_model, full = fit_select(train, ev, grid, support_is_val_context=is_ctx,
                                      select_metric="ndcg@10")
        fast_model, fast = fit_select(train, ev, grid, support_is_val_context=is_ctx,
                                      select_metric="ndcg@10", path_metrics=("ndcg@10",))
        assert fast_model.lam == full_model.lam
        for a, b in zip(fast, full):
            if a.lam == fast_model.lam:
                assert a.val == b.val
            else:
                assert a.val == {"ndcg@10": b.val["ndcg@10"]}
