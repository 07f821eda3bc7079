"""A blend of two scorers (∞-AE and EASE): z-scored per user, mixed with one weight.

For a batch of histories ``H`` and two fitted scorers ``a`` (∞-AE) and ``b`` (EASE)::

    z(s) = (s − mean_row(s)) / std_row(s)          (over every item of the row; std 0 → 1)
    scores(H) = (1 − w) · z(a.scores(H)) + w · z(b.scores(H))

The two models' raw scores live on different scales (kernel regression outputs versus item-item
weights), so each is standardised per user before mixing; ``w`` ∈ [0, 1] is the only parameter
and is chosen on validation alone (:func:`select_weight`): the selection reads the validation
split's score batches and targets and nothing else, so the test split cannot move it.

Every scorer here has the common shape (``n_items``, ``scores``, ``iter_scores``,
``recommend``) that evaluation, the registry and the served model use. Pure NumPy: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import scipy.sparse as sp

from models.infinite_ae import (EvalSet, batch_accumulator, batch_rows, evaluation_plan,
                                finish_evaluation, row_slice)
from models.metrics import RankingAccumulator, top_k_unseen


def zscore_rows(scores: np.ndarray) -> np.ndarray:
    """Each row standardised over its items (float32; a constant row becomes all 0)."""
    s = np.asarray(scores, dtype=np.float32)
    mean = s.mean(axis=1, keepdims=True, dtype=np.float64)
    std = s.std(axis=1, keepdims=True, dtype=np.float64)
    std[std == 0] = 1.0
    return ((s - mean) / std).astype(np.float32)


def mix(z_a: np.ndarray, z_b: np.ndarray, weight: float) -> np.ndarray:
    """``(1 − weight) · z_a + weight · z_b`` (float32)."""
    w = np.float32(weight)
    return (np.float32(1.0) - w) * z_a + w * z_b


def check_weights(weights: Iterable[float]) -> list[float]:
    """The weight grid as floats in [0, 1] (ValueError otherwise)."""
    grid = [float(w) for w in weights]
    if not grid:
        raise ValueError("the blend weight grid is empty")
    bad = [w for w in grid if not (0.0 <= w <= 1.0) or math.isnan(w)]
    if bad:
        raise ValueError(f"blend weights must lie in [0, 1], got {bad}")
    return grid


@dataclass
class Blend:
    """``(1 − weight) · z(a) + weight · z(b)`` of two fitted scorers over the same items."""

    a: Any
    b: Any
    weight: float

    def __post_init__(self) -> None:
        check_weights([self.weight])
        if self.a.n_items != _n_items(self.b):
            raise ValueError(f"the blended models score {self.a.n_items} and {_n_items(self.b)} items")

    @property
    def n_items(self) -> int:
        return int(self.a.n_items)

    def scores(self, histories: Any) -> np.ndarray:
        """Blended scores (b × m) of a batch of history rows (dense or sparse)."""
        (_, sa), = _one_batch(self.a, histories)
        (_, sb), = _one_batch(self.b, histories)
        return mix(zscore_rows(sa), zscore_rows(sb), self.weight)

    def iter_scores(self, histories: Any, batch_size: int = 2048) -> Iterator[tuple[int, np.ndarray]]:
        """``(start_row, scores)`` over row batches (memory bounded as for ∞-AE)."""
        rows = batch_rows(batch_size, self.n_items)
        for start in range(0, histories.shape[0], rows):
            yield start, self.scores(histories[start : start + rows])

    def recommend(self, histories: Any, k: int = 10, batch_size: int = 2048) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` unseen items and their blended scores per history row (best first)."""
        hist = sp.csr_matrix(histories)
        items, scores = [], []
        for start, s in self.iter_scores(hist, batch_size):
            top = top_k_unseen(s, hist[start : start + s.shape[0]], k)
            items.append(top)
            scores.append(np.take_along_axis(s, top, axis=1))
        return np.concatenate(items), np.concatenate(scores)


def _n_items(model: Any) -> int:
    n = getattr(model, "n_items", None)
    return int(n if n is not None else model.n_items_fitted)


def _one_batch(model: Any, histories: Any) -> list[tuple[int, np.ndarray]]:
    """One model's raw scores of ``histories`` as a single batch."""
    if hasattr(model, "scores"):
        return [(0, model.scores(histories))]
    parts = [s for _, s in model.iter_scores(histories, batch_size=max(int(histories.shape[0]), 1))]
    return [(0, parts[0] if len(parts) == 1 else np.concatenate(parts))]


def select_weight(
    batches: Iterable[tuple[int, np.ndarray, np.ndarray]],
    val: EvalSet,
    weights: Iterable[float],
    select_metric: str,
) -> tuple[float, list[dict[str, Any]]]:
    """The weight with the best validation ``select_metric`` (ties: the first of the grid).

    ``batches`` yields ``(start_row, raw scores of a, raw scores of b)`` for consecutive row
    batches of ``val``'s users; each batch is standardised once and every weight is ranked from
    it, so each model scores the validation users once. Returns ``(weight, path)`` with
    ``path = [{"weight", "val": {all metrics}}]``. Only ``val`` is read: no test data.
    """
    grid = check_weights(weights)
    plan = evaluation_plan(None)
    accs = [RankingAccumulator(weights=val.weights, ks=plan.ks) for _ in grid]
    for start, sa, sb in batches:
        za, zb = zscore_rows(sa), zscore_rows(sb)
        part = row_slice(val, start, start + za.shape[0])
        for acc, w in zip(accs, grid):
            acc.merge(batch_accumulator(mix(za, zb, w), part, plan))
    path = [{"weight": w, "val": finish_evaluation(acc, None)} for w, acc in zip(grid, accs)]
    best = max(range(len(grid)), key=lambda i: (path[i]["val"][select_metric], -i))
    return grid[best], path


__all__ = ["Blend", "zscore_rows", "mix", "select_weight", "check_weights"]
