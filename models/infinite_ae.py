"""∞-AE: an autoencoder with infinitely wide hidden layers, fitted in closed form.

Sachdeva et al., NeurIPS 2022 (arXiv 2206.02626). With the NTK ``k`` of the network
(:mod:`models.kernels`) and a support set ``X ∈ [0,1]^{n×m}`` (users' train rows, a user sample or
a Distill-CF summary), training is kernel ridge regression:

    K = k(X, X),   λ̃ = λ · trace(K) / n,   α = (K + λ̃ I)⁻¹ X      (Cholesky solve)
    scores(x_u) = k(x_u, X) α,   seen items of x_u masked before top-k.

K does not depend on λ, so it is computed once per support and every λ of the grid reuses it.
When the users being scored are the support users themselves (validation of a full-data fit),
``K α = X − λ̃ α`` gives their scores without another n×n×m product.

NumPy/SciPy (OpenBLAS, float32) on CPU; JAX on an accelerator (same maths, see
:func:`solve_alpha`). Pure: no file I/O, no Prefect or MLflow here.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

from models.kernels import NTKConfig, ntk_from_dots
from models.metrics import RankingAccumulator, top_k_unseen

FULL_DATA_LAMBDAS: tuple[float, ...] = (0.0, 1.0, 5.0, 20.0, 50.0, 100.0)
SUMMARY_LAMBDAS: tuple[float, ...] = (1e-5, 1e-3, 0.1, 1.0, 5.0, 50.0)
# relative jitter (× trace(K)/n) that replaces λ̃ when K + λ̃I is numerically singular
STABILISING_JITTER = 1e-4


class SingularKernelWarning(UserWarning):
    """K + λ̃I was singular (e.g. λ = 0 with duplicate support rows); λ̃ was stabilised."""


def _dense32(matrix: Any) -> np.ndarray:
    if sp.issparse(matrix):
        return np.asarray(matrix.toarray(), dtype=np.float32)
    return np.ascontiguousarray(matrix, dtype=np.float32)


def _accelerated() -> bool:
    """True when JAX's default backend is a GPU/TPU (then the solves run in JAX)."""
    try:
        import jax

        return jax.default_backend() != "cpu"
    except Exception:  # pragma: no cover - jax always importable in the pinned set
        return False


@dataclass
class InfAE:
    """A fitted ∞-AE: its support rows, dual coefficients α and the λ they were solved with."""

    support: np.ndarray  # n × m float32
    alpha: np.ndarray  # n × m float32
    lam: float
    lam_scaled: float
    config: NTKConfig = field(default_factory=NTKConfig)

    def __post_init__(self) -> None:
        self.support = _dense32(self.support)
        self.alpha = np.ascontiguousarray(self.alpha, dtype=np.float32)
        self._support_sq = (self.support * self.support).sum(axis=1)

    @property
    def n_items(self) -> int:
        return self.support.shape[1]

    def cross_kernel(self, histories: Any) -> np.ndarray:
        """``k(histories, support)``: b × n (closed-form NTK, float32).

        Sparse histories are multiplied as they are (no densifying): at the ≈1–5% density of
        interaction rows that is several times cheaper than a dense product.
        """
        if histories.shape[1] != self.n_items:
            raise ValueError(f"histories have {histories.shape[1]} items, the model has {self.n_items}")
        if sp.issparse(histories):
            h = sp.csr_matrix(histories, dtype=np.float32)
            dots = np.asarray(h @ self._support_t)
            sq = np.asarray(h.multiply(h).sum(axis=1), dtype=np.float32).ravel()
        else:
            h = _dense32(histories)
            dots = h @ self.support.T
            sq = (h * h).sum(axis=1)
        return ntk_from_dots(dots, sq, self._support_sq, self.n_items, self.config)

    @functools.cached_property
    def _support_t(self) -> np.ndarray:
        return np.ascontiguousarray(self.support.T)

    def scores(self, histories: Any) -> np.ndarray:
        """Raw scores ``k(h, X) α`` (b × m) for a batch of history rows (dense or sparse)."""
        return self.cross_kernel(histories) @ self.alpha

    def iter_scores(self, histories: Any, batch_size: int = 2048) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start_row, scores)`` over row batches so memory stays bounded."""
        n = histories.shape[0]
        for start in range(0, n, batch_size):
            yield start, self.scores(histories[start : start + batch_size])

    def recommend(self, histories: Any, k: int = 10, batch_size: int = 2048) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` unseen items and their scores for each history row (best first)."""
        hist = sp.csr_matrix(histories)
        items, scores = [], []
        for start, s in self.iter_scores(hist, batch_size):
            seen = hist[start : start + s.shape[0]]
            top = top_k_unseen(s, seen, k)
            items.append(top)
            scores.append(np.take_along_axis(s, top, axis=1))
        return np.concatenate(items), np.concatenate(scores)


def kernel_matrix(support: Any, config: NTKConfig = NTKConfig()) -> np.ndarray:
    """``K = k(X, X)`` (n × n, float32), computed once per support set."""
    x = _dense32(support)
    sq = (x * x).sum(axis=1)
    return ntk_from_dots(x @ x.T, sq, sq, x.shape[1], config)


def scaled_lambda(kernel: np.ndarray, lam: float) -> float:
    """λ̃ = λ · trace(K) / n (makes λ scale-free)."""
    return float(lam) * float(np.trace(kernel, dtype=np.float64)) / kernel.shape[0]


def solve_alpha(kernel: np.ndarray, targets: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """α = (K + λ̃ I)⁻¹ X by Cholesky; returns ``(α, λ̃ used)``.

    If ``K + λ̃I`` is numerically singular (λ = 0 on duplicate support rows, say), λ̃ is raised to
    ``STABILISING_JITTER · trace(K)/n`` with a :class:`SingularKernelWarning`; never NaN.
    """
    lam_scaled = scaled_lambda(kernel, lam)
    jitter = STABILISING_JITTER * float(np.trace(kernel, dtype=np.float64)) / kernel.shape[0]
    for attempt in range(2):
        alpha = _cholesky_solve(kernel, targets, lam_scaled)
        if alpha is not None and np.all(np.isfinite(alpha)):
            return alpha, lam_scaled
        if attempt == 0:
            warnings.warn(
                f"K + λ̃I is singular at λ={lam:g} (duplicate support rows?): "
                f"stabilised with λ̃={max(lam_scaled, jitter):.3g}",
                SingularKernelWarning,
                stacklevel=2,
            )
            lam_scaled = max(lam_scaled, jitter) if lam_scaled < jitter else lam_scaled * 10
    raise np.linalg.LinAlgError(f"K + λ̃I is not positive definite even at λ̃={lam_scaled:g}")


def _cholesky_solve(kernel: np.ndarray, targets: np.ndarray, lam_scaled: float) -> np.ndarray | None:
    if _accelerated():
        import jax.numpy as jnp
        import jax.scipy.linalg as jsla

        a = jnp.asarray(kernel) + lam_scaled * jnp.eye(kernel.shape[0], dtype=jnp.float32)
        factor = jsla.cho_factor(a, lower=True)
        return np.asarray(jsla.cho_solve(factor, jnp.asarray(targets)))
    a = kernel.copy()
    a[np.diag_indices_from(a)] += np.float32(lam_scaled)
    try:
        factor = sla.cho_factor(a, lower=True, overwrite_a=True, check_finite=False)
    except np.linalg.LinAlgError:
        return None
    return sla.cho_solve(factor, targets, check_finite=False)


@dataclass
class EvalSet:
    """What one evaluation needs: context rows, target rows, seen mask, PSP weights, negatives."""

    context: sp.csr_matrix  # users × items, the rows the model reads
    targets: sp.csr_matrix  # users × items, the held-out items
    weights: np.ndarray  # PSP item weights
    negatives: np.ndarray | None = None  # users × 50 item ids for AUC
    seen: sp.csr_matrix | None = None  # defaults to context

    def __post_init__(self) -> None:
        self.context = sp.csr_matrix(self.context, dtype=np.float32)
        self.targets = sp.csr_matrix(self.targets)
        self.seen = self.context if self.seen is None else sp.csr_matrix(self.seen)


def evaluate_score_batches(batches: Iterable[tuple[int, np.ndarray]], data: EvalSet, k_max: int = 100) -> dict[str, float]:
    """Metrics from ``(start_row, scores)`` batches of a scorer over ``data``'s users."""
    acc = RankingAccumulator(weights=data.weights)
    for start, scores in batches:
        stop = start + scores.shape[0]
        targets = data.targets[start:stop]
        if data.negatives is not None:
            acc.add_auc(scores, targets, data.negatives[start:stop])
        # the batch is ours to overwrite: mask seen items in place
        acc.add(top_k_unseen(scores, data.seen[start:stop], k_max, overwrite=True), targets)
    return acc.result()


def evaluate(model: InfAE, data: EvalSet, batch_size: int = 2048) -> dict[str, float]:
    """All metrics of ``model`` on ``data`` (batched scoring)."""
    return evaluate_score_batches(model.iter_scores(data.context, batch_size), data)


def _solve_recording(kernel: np.ndarray, x: np.ndarray, lam: float) -> tuple[np.ndarray, float, bool]:
    """:func:`solve_alpha`, re-emitting its warnings and saying whether λ̃ was stabilised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SingularKernelWarning)
        alpha, lam_scaled = solve_alpha(kernel, x, lam)
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=3)
    return alpha, lam_scaled, any(issubclass(w.category, SingularKernelWarning) for w in caught)


@dataclass
class LambdaResult:
    lam: float
    lam_scaled: float
    val: dict[str, float]
    stabilised: bool = False


def fit_select(
    support: Any,
    val: EvalSet,
    lambdas: Iterable[float] = FULL_DATA_LAMBDAS,
    config: NTKConfig = NTKConfig(),
    *,
    support_is_val_context: bool = False,
    select_metric: str = "hr@100",
    batch_size: int = 2048,
    kernel: np.ndarray | None = None,
    on_lambda: Callable[[LambdaResult], None] | None = None,
) -> tuple[InfAE, list[LambdaResult]]:
    """Fit ∞-AE for every λ of the grid (one K), keep the best on validation ``select_metric``.

    ``support_is_val_context``: the support rows are exactly ``val.context`` (same users, same
    order) — then validation scores are ``X − λ̃α`` (exact, no extra matrix product).
    Returns the best model and the whole λ path (validation metrics of each λ).
    """
    x = _dense32(support)
    lambdas = list(lambdas)
    if not lambdas:
        raise ValueError("the λ grid is empty")
    if kernel is None:
        kernel = kernel_matrix(x, config)
    cross = None
    if not support_is_val_context:
        sup_sq = (x * x).sum(axis=1)
        ctx = val.context

        def cross_batches() -> Iterator[tuple[int, np.ndarray]]:
            for start in range(0, ctx.shape[0], batch_size):
                h = _dense32(ctx[start : start + batch_size])
                yield start, ntk_from_dots(h @ x.T, (h * h).sum(axis=1), sup_sq, x.shape[1], config)

        if ctx.shape[0] * x.shape[0] * 4 <= 512 * 2**20:  # cache k(C, X) when small (≤ 512 MB)
            cross = list(cross_batches())

    path: list[LambdaResult] = []
    best: InfAE | None = None
    best_value = -math.inf
    for lam in lambdas:
        alpha: np.ndarray | None = None
        stabilised = False
        lam_scaled = scaled_lambda(kernel, lam)
        if support_is_val_context and lam_scaled == 0.0:
            # λ = 0 interpolates the support: K K⁻¹ X = X, so the scores of the support users are
            # their own rows (every unseen item ties at 0). Exact, and no solve is needed unless
            # this λ is the one kept.
            batches = ((s, x[s : s + batch_size].copy()) for s in range(0, x.shape[0], batch_size))
        else:
            alpha, lam_scaled, stabilised = _solve_recording(kernel, x, lam)
            if support_is_val_context:
                # K α = X − λ̃ α ; seen (support) items are masked, so the rest ranks by −α
                batches = ((s, x[s : s + batch_size] - lam_scaled * alpha[s : s + batch_size])
                           for s in range(0, x.shape[0], batch_size))
            else:
                source = cross if cross is not None else cross_batches()
                batches = ((s, kb @ alpha) for s, kb in source)
        metrics = evaluate_score_batches(batches, val)
        result = LambdaResult(lam=float(lam), lam_scaled=lam_scaled, val=metrics, stabilised=stabilised)
        path.append(result)
        if on_lambda is not None:
            on_lambda(result)
        if metrics[select_metric] > best_value:
            if alpha is None:
                alpha, lam_scaled, result.stabilised = _solve_recording(kernel, x, lam)
                result.lam_scaled = lam_scaled
            best_value = metrics[select_metric]
            best = InfAE(support=x, alpha=alpha, lam=float(lam), lam_scaled=lam_scaled, config=config)
    assert best is not None
    return best, path
