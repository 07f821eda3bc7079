"""Baselines for the evaluation gates: PopRec and EASE (Steck, WWW 2019).

EASE, closed form: ``G = XᵀX + λI``, ``P = G⁻¹``, ``B = −P / diag(P)`` column-wise with
``diag(B) = 0``; scores ``x_u B``. λ is chosen on a validation metric (``select_metric``, default
HR@100 as in the paper) from a grid reaching ≥ 1000 (tuned that way EASE is slightly ahead of
∞-AE on ML-1M). Pure NumPy/SciPy, no I/O.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

from models.infinite_ae import EvalSet, batch_rows, check_select_metric, evaluate_score_batches

EASE_LAMBDAS: tuple[float, ...] = (1.0, 10.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0)


@dataclass
class PopRec:
    """Scores every item by its train popularity, the same for every user."""

    counts: np.ndarray

    @classmethod
    def fit(cls, train: sp.spmatrix) -> "PopRec":
        return cls(counts=np.asarray(train.sum(axis=0)).ravel().astype(np.float32))

    def iter_scores(self, histories: Any, batch_size: int = 4096) -> Iterator[tuple[int, np.ndarray]]:
        batch_size = batch_rows(batch_size, self.counts.size)
        for start in range(0, histories.shape[0], batch_size):
            b = min(batch_size, histories.shape[0] - start)
            yield start, np.broadcast_to(self.counts, (b, self.counts.size)).copy()


# score of the items an EASE fitted on part of the catalogue does not model: below every real
# score, above masked (−∞) ones
UNMODELLED_SCORE = np.float32(-3.0e38)


@dataclass
class EASE:
    """A fitted EASE item-item model (on every item, or on the catalogue's columns ``items``)."""

    weights: np.ndarray  # N × N, zero diagonal (N = m, or len(items))
    lam: float
    items: np.ndarray | None = None  # the modelled columns (sorted); None: every item
    n_items: int | None = None  # the catalogue's size (with ``items``)

    @property
    def n_items_fitted(self) -> int:
        return self.weights.shape[0]

    def iter_scores(self, histories: Any, batch_size: int = 4096) -> Iterator[tuple[int, np.ndarray]]:
        """Scores of row batches; with ``items``, items outside them get :data:`UNMODELLED_SCORE`
        (histories are read on the modelled items only)."""
        batch_size = batch_rows(batch_size, self.n_items or self.n_items_fitted)
        for start in range(0, histories.shape[0], batch_size):
            h = histories[start : start + batch_size]
            if self.items is not None:
                h = h[:, self.items]
            h = h.toarray() if sp.issparse(h) else np.asarray(h)
            scores = h.astype(np.float32) @ self.weights
            if self.items is not None:
                full = np.full((scores.shape[0], self.n_items), UNMODELLED_SCORE, dtype=np.float32)
                full[:, self.items] = scores
                scores = full
            yield start, scores


def most_popular_items(train: sp.spmatrix, n: int) -> np.ndarray:
    """The ``n`` items with the most train interactions (ties by lower id), sorted by id."""
    counts = np.asarray(train.sum(axis=0)).ravel()
    order = np.lexsort((np.arange(counts.size), -counts))
    return np.sort(order[:n])


def ease_weights(gram: np.ndarray, lam: float) -> np.ndarray:
    """EASE's B from the item Gram ``XᵀX`` (float64 solve for stability)."""
    g = gram.astype(np.float64, copy=True)
    g[np.diag_indices_from(g)] += lam
    p = sla.inv(g, overwrite_a=True, check_finite=False)
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b.astype(np.float32)


def ease_items(train: sp.spmatrix, max_items: int | None) -> tuple[np.ndarray | None, str, float]:
    """``(items, description, coverage)`` of the EASE baseline: every item (``items`` None) up to
    ``max_items`` (``evaluate.ease_max_items``), else the ``max_items`` most popular, with the
    share of train interactions on them. One rule for the fit and the evaluate stage."""
    n_items = train.shape[1]
    if max_items is None or n_items <= max_items:
        return None, f"EASE on all {n_items} items", 1.0
    items = most_popular_items(train, max_items)
    counts = np.asarray(train.sum(axis=0)).ravel()
    coverage = float(counts[items].sum() / max(counts.sum(), 1))
    description = (f"EASE on the {len(items)} most popular of {n_items} items "
                   f"(evaluate.ease_max_items; {100 * coverage:.1f}% of train interactions), "
                   "other items score lowest")
    return items, description, coverage


def fit_ease_select(
    train: sp.spmatrix,
    val: EvalSet,
    lambdas: Iterable[float],
    select_metric: str,
    on_lambda: Callable[[float, dict[str, float], float], None] | None = None,
    *,
    items: np.ndarray | None = None,
) -> tuple[EASE, list[dict[str, Any]]]:
    """Fit EASE for each λ and keep the best on validation ``select_metric``.

    ``select_metric``: any of :data:`models.metrics.METRIC_KEYS` (ties keep the first λ).
    ``items``: fit on these columns only (sorted ids; the item × item inverse is then
    ``len(items)``² instead of m²); the others score lowest. ``on_lambda(λ, metrics, seconds)``
    after each λ. Returns the best model and the path ``[{"lambda", "val"}]``.
    """
    check_select_metric(select_metric, val)
    lambdas = list(lambdas)
    if not lambdas:
        raise ValueError("the λ grid is empty")
    x = sp.csr_matrix(train, dtype=np.float32)
    n_items = x.shape[1]
    if items is not None:
        items = np.asarray(items, dtype=np.int64)
        x = x[:, items]
    gram = (x.T @ x).toarray()
    best: EASE | None = None
    best_value = -math.inf
    path = []
    for lam in lambdas:
        started = time.perf_counter()
        model = EASE(weights=ease_weights(gram, lam), lam=float(lam), items=items,
                     n_items=n_items if items is not None else None)
        metrics = evaluate_score_batches(model.iter_scores(val.context), val)
        path.append({"lambda": float(lam), "val": metrics})
        if on_lambda is not None:
            on_lambda(float(lam), metrics, time.perf_counter() - started)
        if metrics[select_metric] > best_value:
            best, best_value = model, metrics[select_metric]
    assert best is not None
    return best, path
