"""Baseline support samplers that Distill-CF is compared with, at the same user budget.

* :func:`random_users` — ``budget`` users drawn uniformly without replacement (seeded);
* :func:`head_users` — the ``budget`` most active users (most train interactions; ties broken by
  the lower user index).

Both return the chosen users' train rows as a dense float32 ``budget × m`` matrix, the support
set that ∞-AE is then fitted on. Users without any train interaction are never chosen. Pure: no
file I/O.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp


def _active_counts(train: Any) -> np.ndarray:
    train = sp.csr_matrix(train)
    return np.diff(train.indptr)


def _check_budget(budget: int, n_active: int) -> None:
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    if budget > n_active:
        raise ValueError(f"budget {budget} exceeds the {n_active} users with train interactions")


def random_user_indices(train: Any, budget: int, seed: int) -> np.ndarray:
    """Indices of ``budget`` distinct random users with at least one train interaction."""
    active = np.flatnonzero(_active_counts(train) > 0)
    _check_budget(budget, len(active))
    rng = np.random.default_rng(seed)
    return active[rng.choice(len(active), size=budget, replace=False)]


def head_user_indices(train: Any, budget: int) -> np.ndarray:
    """Indices of the ``budget`` most active users, most active first (ties: lower index first)."""
    counts = _active_counts(train)
    _check_budget(budget, int((counts > 0).sum()))
    order = np.lexsort((np.arange(len(counts)), -counts))  # last key is primary
    return order[:budget]


def rows_of(train: Any, users: np.ndarray) -> np.ndarray:
    """Dense float32 train rows of ``users`` (binary), in the given order."""
    rows = sp.csr_matrix(train)[users].toarray().astype(np.float32)
    np.minimum(rows, 1.0, out=rows)
    return rows


def random_users(train: Any, budget: int, seed: int) -> np.ndarray:
    """Train rows of ``budget`` random users (dense float32 ``budget × m``)."""
    return rows_of(train, random_user_indices(train, budget, seed))


def head_users(train: Any, budget: int) -> np.ndarray:
    """Train rows of the ``budget`` most active users (dense float32 ``budget × m``)."""
    return rows_of(train, head_user_indices(train, budget))


__all__ = ["random_users", "head_users", "random_user_indices", "head_user_indices", "rows_of"]
