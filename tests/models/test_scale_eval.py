"""Evaluation that costs what it must, and λ grids that no numerical condition ends:

* a λ whose ``K + λ̃I`` is not positive definite in float32 is solved in float64 or with a raised
  λ̃ (``stabilised``), or skipped — the grid goes on and the path says which; a grid where every
  λ fails is one error naming the kernel's size;
* the seeded user sample: the same users for every model, figures equal to the full ones when the
  cap is not reached, intervals beside them;
* top-k over item tiles equals the untiled top-k;
* EASE on the most popular items equals a dense EASE on those columns.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from models.baselines import EASE, UNMODELLED_SCORE, ease_weights, fit_ease_select
from models.infinite_ae import (EvalSet, LambdaGridError, SingularKernelWarning,
                                SkippedLambdaWarning, evaluate_score_batches, fit_select,
                                kernel_matrix, scaled_lambda, solve_alpha_info)
from models.linalg import spd_solve
from models.metrics import (RankingAccumulator, merge_top_k, sample_users, top_k_tiled,
                            top_k_unseen)
from tests.models.test_infinite_ae import low_rank_data


def near_duplicate_rows(n: int = 1000, m: int = 5000, seed: int = 0) -> np.ndarray:
    """One dense row repeated n times with a few flipped entries: K's smallest eigenvalue is ≈ 0
    and float32 Cholesky breaks down at λ = 1e-5 (measured with one and two BLAS threads; 800
    rows fail with two threads only), float64 does not."""
    rng = np.random.default_rng(seed)
    row = (rng.random(m) < 0.5).astype(np.float32)
    x = np.tile(row, (n, 1))
    flip = rng.random((n, m)) < 0.0002
    x[flip] = 1 - x[flip]
    return x


def _evalset(x: np.ndarray, seed: int = 1) -> EvalSet:
    rng = np.random.default_rng(seed)
    targets = sp.csr_matrix((rng.random(x.shape) < 0.01) & (x == 0), dtype=np.float32)
    return EvalSet(context=sp.csr_matrix(x), targets=targets, weights=np.ones(x.shape[1]))


@pytest.fixture
def one_blas_thread():
    """Cholesky's rounding depends on the BLAS thread count: these tests fix it."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def test_a_kernel_not_definite_in_float32_is_stabilised_and_the_grid_goes_on(one_blas_thread):
    x = near_duplicate_rows()
    kernel = kernel_matrix(x)
    # the premise: float32 Cholesky fails at the smallest λ of the summary grid
    assert spd_solve(kernel, x, shift=scaled_lambda(kernel, 1e-5)) is None
    ev = _evalset(x)
    with pytest.warns(SingularKernelWarning, match="float64"):
        model, path = fit_select(x, ev, [1e-5, 1e-3, 0.1], kernel=kernel, select_metric="hr@100",
                                 path_metrics=("hr@100",))
    assert [p.status for p in path][0] == "stabilised (float64)"
    assert path[0].lam_scaled == pytest.approx(scaled_lambda(kernel, 1e-5))  # λ itself kept
    assert all(np.isfinite(p.val["hr@100"]) for p in path)
    assert np.isfinite(model.alpha).all()


def _indefinite_kernel(n: int = 60, negative: float = -0.5, seed: int = 0) -> np.ndarray:
    """A symmetric float32 'kernel' with one eigenvalue ``negative × trace/n``."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eig = rng.uniform(0.5, 1.5, n)
    eig[0] = negative * eig[1:].sum() / (n - 1 + negative)  # ≈ negative × (trace / n)
    return ((q * eig) @ q.T).astype(np.float32)


def test_small_lambdas_on_an_indefinite_kernel_are_raised_or_skipped_and_reported():
    n, m = 60, 80
    rng = np.random.default_rng(3)
    x = (rng.random((n, m)) < 0.2).astype(np.float32)
    ev = _evalset(x)
    # one eigenvalue at −0.005·t: λ = 1e-5 is raised to 1e-2·t; −0.5·t: beyond the bound, skipped
    mild = _indefinite_kernel(n, negative=-0.005)
    alpha, shift, how = solve_alpha_info(mild, x, 1e-5)
    assert how == "shift" and shift > 0.005 * np.trace(mild) / n and np.isfinite(alpha).all()

    bad = _indefinite_kernel(n, negative=-0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, path = fit_select(x, ev, [1e-5, 0.01, 5.0], kernel=bad, select_metric="ndcg@10")
    assert [p.status for p in path] == ["skipped", "skipped", "ok"]
    assert path[0].val == {} and model.lam == 5.0
    assert sum(issubclass(w.category, SkippedLambdaWarning) for w in caught) == 2

    with pytest.raises(LambdaGridError, match=r"kernel 60 × 60"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_select(x, ev, [1e-5, 0.01], kernel=bad, select_metric="ndcg@10")


def test_the_fit_stage_reports_which_lambda_was_stabilised(tmp_path, one_blas_thread):
    """tasks.fit on a summary of near-duplicate rows: the λ path in the report says which."""
    import polars as pl

    from tasks.data import load_dataset
    from tasks.fit import fit_dataset
    from tasks.ingest import ingest
    from tasks.summary import write_summary

    x = near_duplicate_rows(n=800, m=1500)
    rng = np.random.default_rng(5)
    users, items = np.nonzero(rng.random((300, 1500)) < 0.05)
    pl.DataFrame({"user_id": users, "item_id": items}).write_csv(tmp_path / "log.csv")
    ingest(tmp_path / "log.csv", tmp_path / "data")
    ds = load_dataset(tmp_path / "data")
    write_summary(tmp_path / "summary.parquet", x[:, ds.item_ids.astype(np.int64)], ds.item_ids,
                  {"sampler": "test"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SingularKernelWarning)
        _, report = fit_dataset(ds, lambdas=[1e-5, 1.0], select_metric="ndcg@10",
                                support_path=tmp_path / "summary.parquet")
    statuses = [p["status"] for p in report["lambda_path"]]
    assert statuses[0].startswith("stabilised") and statuses[1] == "ok"
    assert report["metrics"]["sample"]["test_users"] == report["metrics"]["sample"]["test_population"]


def test_the_user_sample_is_seeded_shared_and_full_below_the_cap():
    train, val, w = low_rank_data(7, n=300)
    assert sample_users(val, 300, seed=0) is None and sample_users(val, None, seed=0) is None
    a, b = sample_users(val, 100, seed=0), sample_users(val, 100, seed=0)
    np.testing.assert_array_equal(a, b)  # the same users for every model scored
    assert len(a) == 100 and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, sample_users(val, 100, seed=1))
    assert np.all(np.diff(val.tocsr().indptr)[a] > 0)  # only users with targets

    ev = EvalSet(context=train, targets=val, weights=w)
    scores = np.random.default_rng(0).random(train.shape).astype(np.float32)
    full_stats: dict = {}
    full = evaluate_score_batches([(0, scores.copy())], ev, stats=full_stats)
    # the cap above the user count: the whole set, figures identical
    same = ev.subset(sample_users(val, 10_000, seed=0))
    assert same is ev
    sub = ev.subset(a)
    sub_stats: dict = {}
    sampled = evaluate_score_batches([(0, scores[a].copy())], sub, stats=sub_stats)
    assert sub_stats["users"] == 100 and sub.population == full_stats["users"]
    for key, value in sampled.items():  # each sampled figure within a few intervals of the full
        assert abs(value - full[key]) <= 4 * sub_stats["ci95"][key] + 1e-9
        assert sub_stats["ci95"][key] >= full_stats["ci95"][key] >= 0
    assert sub_stats["ci95"]["ndcg@10"] > full_stats["ci95"]["ndcg@10"] > 0


def test_intervals_match_the_per_user_standard_error():
    rng = np.random.default_rng(2)
    acc = RankingAccumulator(weights=np.ones(50), ks=(10,))
    targets = sp.csr_matrix(rng.random((40, 50)) < 0.1, dtype=np.float32)
    targets[0, 0] = 1.0
    targets = targets[np.diff(targets.indptr) > 0]
    ranked = np.argsort(-rng.random((targets.shape[0], 50)), axis=1)[:, :10]
    acc.add(ranked, targets)
    hits = np.array([[targets[u, i] > 0 for i in ranked[u]] for u in range(targets.shape[0])])
    per_user = 100 * hits.sum(axis=1) / np.minimum(np.diff(targets.indptr), 10)
    expected = 1.959964 * per_user.std(ddof=1) / np.sqrt(len(per_user))
    assert acc.intervals()["hr@10"] == pytest.approx(expected, rel=1e-9)
    assert acc.result()["hr@10"] == pytest.approx(per_user.mean(), rel=1e-12)


@pytest.mark.parametrize("block", [1, 7, 64, 500])
def test_top_k_over_item_tiles_equals_the_untiled_top_k(block):
    rng = np.random.default_rng(block)
    scores = rng.integers(0, 6, size=(30, 230)).astype(np.float32)  # many ties, also at the cut
    scores[3, :] = 0.0
    scores[4, 10] = np.nan
    seen = sp.csr_matrix(rng.random((30, 230)) < 0.3)
    seen[5, :] = True  # a user who has seen everything
    for k in (1, 10, 100, 230):
        untiled = top_k_unseen(scores, seen, k)
        tiled = top_k_tiled(lambda lo, hi: scores[:, lo:hi], 230, seen, k, item_block=block)
        np.testing.assert_array_equal(tiled, untiled)


def test_merge_top_k_keeps_lower_ids_on_ties():
    items, scores = merge_top_k(np.array([[5, 9]]), np.array([[1.0, 0.5]]),
                                np.array([[2, 3]]), np.array([[1.0, 0.5]]), 3)
    np.testing.assert_array_equal(items, [[2, 5, 3]])
    np.testing.assert_array_equal(scores, [[1.0, 1.0, 0.5]])


def test_ease_on_the_most_popular_items_equals_a_dense_ease_on_those_columns():
    train, val, w = low_rank_data(11, n=200)
    m = train.shape[1]
    items = np.sort(np.argsort(-np.asarray(train.sum(axis=0)).ravel(), kind="stable")[: m // 2])
    ev = EvalSet(context=train, targets=val, weights=w)
    model, path = fit_ease_select(train, ev, [10.0, 100.0], select_metric="ndcg@10", items=items)
    assert model.n_items_fitted == len(items) and len(path) == 2
    # the dense reference: EASE's closed form on the kept columns, other items lowest
    xs = train.toarray()[:, items].astype(np.float64)
    g = xs.T @ xs + model.lam * np.eye(len(items))
    p = np.linalg.inv(g)
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    np.testing.assert_allclose(model.weights, b, rtol=2e-3, atol=1e-5)
    scores = np.concatenate([s for _, s in model.iter_scores(train, batch_size=64)])
    assert scores.shape == (train.shape[0], m)
    others = np.setdiff1d(np.arange(m), items)
    assert np.all(scores[:, others] == UNMODELLED_SCORE)
    np.testing.assert_allclose(scores[:, items], xs @ b, rtol=2e-3, atol=1e-4)
    full = EASE(weights=ease_weights((train.T @ train).toarray(), 10.0), lam=10.0)
    assert full.n_items_fitted == m


def test_validation_on_a_sample_of_the_support_users_equals_the_slow_path():
    """∞-AE on every user, validated on a user sample: ``val_rows`` (K α = X − λ̃α on those rows)
    gives the figures of scoring the sample through the cross kernel."""
    train, val, w = low_rank_data(9, n=240)
    rows = sample_users(val, 90, seed=4)
    ev = EvalSet(context=train, targets=val, weights=w).subset(rows)
    assert ev.population > 90 and ev.n_users == 90
    fast_model, fast = fit_select(train, ev, [0.5, 5.0, 50.0], val_rows=rows,
                                  select_metric="ndcg@10")
    slow_model, slow = fit_select(train, ev, [0.5, 5.0, 50.0], select_metric="ndcg@10")
    assert fast_model.lam == slow_model.lam
    for a, b in zip(fast, slow):
        for key in a.val:
            assert a.val[key] == pytest.approx(b.val[key], abs=1e-6), (a.lam, key)
