"""Ranking and metrics in JAX (models.jax_ranking, models.jax_infae) against the NumPy path, on CPU;
compile once (a trace counter); bench.gpu's reader and its imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from models.infinite_ae import EvalSet, evaluate, evaluate_score_batches, fit_select, support_gram
from models.jax_infae import fit_select_device
from models.jax_ranking import TRACES, evaluate_score_batches_jax, top_k_exact
from models.metrics import propensity_weights, sample_negatives, top_k_unseen

REPO = Path(__file__).resolve().parents[2]


def _problem(seed: int = 0, n: int = 150, m: int = 130):
    """Train / validation / test of a small random log with popularity (ties and empty rows)."""
    rng = np.random.default_rng(seed)
    pop = rng.random(m) ** 3
    full = (rng.random((n, m)) < 0.6 * pop).astype(np.float32)
    full[3] = 0.0  # a user with nothing
    cut = rng.random((n, m))
    train, val, test = (sp.csr_matrix(full * mask) for mask in
                        (cut < 0.8, (cut >= 0.8) & (cut < 0.9), cut >= 0.9))
    for mat in (train, val, test):
        mat.eliminate_zeros()
    weights = propensity_weights(np.asarray(train.sum(axis=0)).ravel(), int(train.nnz))
    negatives = sample_negatives(train + test, 50, 0)
    val_set = EvalSet(context=train, targets=val, weights=weights, negatives=negatives)
    ctx = (train + val).tocsr()
    ctx.data[:] = 1.0
    test_set = EvalSet(context=ctx, targets=test, weights=weights, negatives=negatives)
    return train, val_set, test_set


def _close(a: dict, b: dict, rel: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-9), key


def test_top_k_exact_is_numpys_order_with_ties_nan_and_masked_rows():
    rng = np.random.default_rng(1)
    n, m = 40, 150
    scores = rng.normal(size=(n, m)).astype(np.float32)
    scores[:, :60] = np.round(scores[:, :60])  # many ties, also at the cut
    scores[5] = 0.0  # a row of one value
    scores[7, [3, 9]] = np.nan
    seen = sp.csr_matrix(rng.random((n, m)) < 0.2)
    full_row = np.zeros(m, dtype=bool)
    full_row[4:] = True  # a user who has seen all but 4 items: the list ends with −∞ items
    seen = sp.vstack([seen[:9], sp.csr_matrix(full_row), seen[10:]]).tocsr()
    masked = scores.copy()
    masked[seen.nonzero()] = -np.inf
    for k in (1, 10, 100, m):
        np.testing.assert_array_equal(np.asarray(top_k_exact(masked, k)),
                                      top_k_unseen(scores, seen, k))


def test_jax_metrics_equal_numpy_metrics_and_intervals():
    _, val, _ = _problem()
    rng = np.random.default_rng(2)
    scores = rng.normal(size=val.targets.shape).astype(np.float32)
    scores[:, :30] = np.round(scores[:, :30])

    def batches():
        for start in range(0, scores.shape[0], 64):
            yield start, scores[start : start + 64].copy()

    for metrics in (None, ("hr@100",), ("ndcg@10", "hr@10"), ("psp@100", "auc")):
        ref_stats, got_stats = {}, {}
        ref = evaluate_score_batches(batches(), val, metrics=metrics, stats=ref_stats)
        got = evaluate_score_batches_jax(batches(), val, metrics=metrics, stats=got_stats)
        _close(ref, got)
        assert got_stats["users"] == ref_stats["users"]
        _close(ref_stats["ci95"], got_stats["ci95"], rel=1e-4)


def test_device_fit_select_and_test_equal_numpy_and_compile_once():
    train, val, test = _problem(seed=3)
    support = train.toarray()
    grid = (1.0, 5.0, 20.0, 50.0)  # λ > 0: K + λ̃I well conditioned in float32 on both paths
    start = dict(TRACES)
    for on_support in (True, False):
        ref_model, ref_path = fit_select(support, val, grid, support_is_val_context=on_support,
                                         select_metric="ndcg@10", path_metrics=("ndcg@10",),
                                         batch_size=32)
        model, path = fit_select_device(support, val, grid, support_is_val_context=on_support,
                                        select_metric="ndcg@10", path_metrics=("ndcg@10",),
                                        batch=32)
        assert model.lam == ref_model.lam
        for a, b in zip(ref_path, path):
            assert b.lam_scaled == pytest.approx(a.lam_scaled, rel=1e-6)
            _close(a.val, b.val, rel=1e-4)
        gram = support_gram(support) if on_support else None
        _close(evaluate(ref_model, test, batch_size=32, support_gram=gram),
               model.evaluate(test, batch=32), rel=1e-4)
    # every user's top 10 on the device: InfAE.recommend's lists (same model on the host)
    items, scores = model.recommend(test.context, 10, batch=32)
    ref_items, ref_scores = model.to_host().recommend(test.context, 10)
    np.testing.assert_array_equal(items, ref_items)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
    # compile once: another grid, longer, with the same shapes traces nothing new (5 batches
    # of 32 users each time, the last one padded)
    before = dict(TRACES)
    model, _ = fit_select_device(support, val, (2.0, 3.0, 7.0, 11.0, 13.0, 17.0),
                                 support_is_val_context=False, select_metric="ndcg@10",
                                 path_metrics=("ndcg@10",), batch=32)
    model.evaluate(test, batch=32)
    assert dict(TRACES) == before
    # the first two grids (4 λ, 5 batches each, and test): one trace per plan (reduced, full)
    traced = {key: before.get(key, 0) - start.get(key, 0) for key in before}
    assert traced["cross_metrics"] <= 1 and traced["support_metrics"] <= 2, traced  # test: 1
    assert traced["kernel_metrics"] <= 2 and traced["cross_kernel"] <= 1, traced
    assert traced["solve"] <= 1 and traced["kernel"] <= 1, traced


def test_bench_gpu_needs_no_polars_prefect_mlflow_dvc_and_reads_parquet_like_ingest(tmp_path):
    import polars as pl

    rng = np.random.default_rng(4)
    rows = 3000
    frame = pl.DataFrame({"user_id": rng.integers(0, 400, rows) * 7 + 11,
                          "item_id": rng.integers(0, 300, rows) * 3 + 5,
                          "rating": rng.integers(1, 6, rows),
                          "split": rng.choice(["train", "val", "test"], rows, p=[0.8, 0.1, 0.1])})
    frame = frame.unique(["user_id", "item_id"], keep="first", maintain_order=True)
    path = tmp_path / "log.parquet"
    frame.write_parquet(path)
    # bench.gpu's imports, its Parquet reader and its generator in a process where those packages
    # cannot be imported (the GPU machine has JAX, NumPy, SciPy and pyarrow only). Its whole run is
    # too slow for the suite (≈ 12 s of compilations on 2 cores, tiny data): run by hand, see README
    code = ("import sys\n"
            "for name in ('polars', 'prefect', 'mlflow', 'dvc', 'yaml'):\n"
            "    sys.modules[name] = None\n"
            "import bench.gpu, models.jax_infae, models.distill_cf, models.baselines\n"
            f"d = bench.gpu.load_parquet({str(path)!r})\n"
            "g = bench.gpu.generate(300, 80, 6000)\n"
            "assert g.train.shape[1] == 80 and g.val_set(100, 0).n_users == 100\n"
            "print(d.train.nnz, d.val.nnz, d.test.nnz)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    from bench.gpu import load_parquet
    from tasks.data import load_dataset
    from tasks.ingest import ingest

    ingest(path, tmp_path / "processed")
    ref = load_dataset(tmp_path / "processed")
    got = load_parquet(path)
    for name in ("train", "val", "test"):
        assert (getattr(ref, name) != getattr(got, name)).nnz == 0, name
    np.testing.assert_array_equal(ref.negatives, got.negatives)


def test_distill_targets_built_on_device_and_device_validation_equal_numpy():
    from models.distill_cf import DistillConfig, _validate, dense_rows_on_device
    from models.jax_infae import make_validator
    from models.samplers import random_users, rows_of

    train, val, _ = _problem(seed=5)
    users = np.array([0, 3, 7, 8, 40, 149])
    np.testing.assert_array_equal(np.asarray(dense_rows_on_device(train, users)),
                                  rows_of(train, users))
    config = DistillConfig(budget=20, lambdas=(1.0, 5.0, 50.0), select_metric="ndcg@10")
    support = random_users(train, 20, 0)
    ref_lam, ref_val, ref_path = _validate(support, val, config)
    lam, got_val, path = make_validator(batch=64)(support, val, config)
    assert lam == ref_lam and [p[0] for p in path] == [p[0] for p in ref_path]
    _close(ref_val, got_val, rel=1e-4)
    for (_, a), (_, b) in zip(ref_path, path):
        assert b == pytest.approx(a, rel=1e-4)
