"""Blocked ∞-AE prediction (models.large) equals the unblocked InfAE path, with bounded batches."""

import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp

from models.infinite_ae import InfAE, kernel_matrix, solve_alpha
from models.kernels import NTKConfig
from models.large import (
    BlockedScorer,
    batch_rows_for,
    blocked_kernel_matrix,
    fit_support,
    iter_top_k,
    recommend_all,
)


def sparse_histories(seed=0, n=300, m=80, density=0.08):
    """Binary users × items with power-law item popularity; every row has an item."""
    rng = np.random.default_rng(seed)
    pop = np.arange(1, m + 1, dtype=float) ** -0.7
    prob = np.minimum(1.0, density * m * pop / pop.sum())
    full = rng.random((n, m)) < prob[rng.permutation(m)][None, :]
    full[np.arange(n), rng.integers(0, m, n)] = True
    return sp.csr_matrix(full.astype(np.float32))


@pytest.fixture(scope="module")
def model():
    support = sparse_histories(seed=1, n=60)
    x = support.toarray()
    alpha, lam_scaled = solve_alpha(kernel_matrix(x), x, 5.0)
    return InfAE(support=x, alpha=alpha, lam=5.0, lam_scaled=lam_scaled)


@pytest.mark.parametrize("batch_size", [1, 7, 64, 1000])
@pytest.mark.parametrize("threads", [1, 2])
def test_blocked_top_k_equals_unblocked_recommend(model, batch_size, threads):
    hist = sparse_histories(seed=2, n=600)  # ≥ 2 × 256 rows: a whole batch is split on threads
    want_items, want_scores = model.recommend(hist, k=20, batch_size=10_000)
    items, scores = recommend_all(model, hist, k=20, batch_size=batch_size, threads=threads)
    assert items.shape == (600, 20) and items.dtype == np.int32 and scores.dtype == np.float32
    np.testing.assert_array_equal(items, want_items)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
    # nothing the user has seen is recommended
    assert not np.asarray(hist[np.repeat(np.arange(600), 20), items.ravel()]).any()


def test_sparse_and_dense_histories_agree(model):
    hist = sparse_histories(seed=3, n=700)  # > 2 × 256 rows: chunks run on threads
    with BlockedScorer(model, threads=2) as scorer:
        dense = scorer.scores(hist.toarray())
        sparse = scorer.scores(hist)
        np.testing.assert_allclose(sparse, dense, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sparse, model.scores(hist), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(scorer.cross_kernel(hist), model.cross_kernel(hist), rtol=1e-6)
        a = list(scorer.iter_top_k(hist, k=10, batch_size=128))
        b = list(scorer.iter_top_k(hist.toarray(), k=10, batch_size=128))
    assert [s for s, _, _ in a] == list(range(0, 700, 128))
    for (_, ia, sa), (_, ib, sb) in zip(a, b):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_allclose(sa, sb, rtol=1e-5, atol=1e-5)


def test_non_binary_histories_and_explicit_seen(model):
    rng = np.random.default_rng(4)
    hist = sparse_histories(seed=4, n=50)
    hist.data = rng.uniform(0.2, 1.0, hist.nnz).astype(np.float32)  # weighted rows
    seen = sparse_histories(seed=5, n=50)
    items, _ = recommend_all(model, hist, k=15, seen=seen, batch_size=16)
    s = model.scores(hist)
    from models.metrics import top_k_unseen

    np.testing.assert_array_equal(items, top_k_unseen(s, seen, 15))


def test_batches_are_bounded(model, monkeypatch):
    """Every step sees at most batch_size rows, and peak traced memory follows the batch."""
    hist = sparse_histories(seed=6, n=2000, m=80)
    seen_rows = []
    real = BlockedScorer.scores

    def spy(self, rows, out=None):
        seen_rows.append(rows.shape[0])
        return real(self, rows, out=out)

    monkeypatch.setattr(BlockedScorer, "scores", spy)
    out = list(iter_top_k(model, hist, k=5, batch_size=300))
    assert max(seen_rows) == 300 and sum(seen_rows) == 2000
    assert [s for s, _, _ in out] == list(range(0, 2000, 300))

    def traced_peak(batch):
        recommend_all(model, hist, k=5, batch_size=batch)  # warm (JIT) outside the trace
        tracemalloc.start()
        recommend_all(model, hist, k=5, batch_size=batch)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    small, large = traced_peak(50), traced_peak(2000)
    # the whole-matrix run holds 2000 × 80 scores (+ top-k temporaries); 50-row batches far less
    assert small < large / 4, (small, large)


def test_batch_rows_for_budget():
    b = batch_rows_for(5000, 10_000, 600 * 2**20)
    assert 6000 < b < 9000  # ≈ 80 KB per row + a fixed 33 MB for top-k
    assert batch_rows_for(10, 10, 1) == 1


@pytest.mark.parametrize("depth", [1, 2])
def test_blocked_kernel_matrix_equals_kernel_matrix(depth):
    config = NTKConfig(depth=depth)
    x = sparse_histories(seed=7, n=90)
    want = kernel_matrix(x.toarray(), config)
    for block_rows, threads in ((16, 2), (1000, 1)):
        got = blocked_kernel_matrix(x, config, block_rows=block_rows, threads=threads)
        np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(blocked_kernel_matrix(x.toarray(), config, block_rows=32), want, rtol=1e-6)


def test_fit_support_matches_closed_form():
    x = sparse_histories(seed=8, n=70)
    m = fit_support(x, 5.0)
    alpha, lam_scaled = solve_alpha(kernel_matrix(x.toarray()), x.toarray(), 5.0)
    np.testing.assert_allclose(m.alpha, alpha, rtol=1e-4, atol=1e-5)
    assert m.lam == 5.0 and m.lam_scaled == pytest.approx(lam_scaled)


def test_item_count_mismatch_is_an_error(model):
    with BlockedScorer(model) as scorer, pytest.raises(ValueError, match="items"):
        scorer.scores(sp.csr_matrix((3, model.n_items + 1), dtype=np.float32))
