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

import collections
import functools
import math
import os
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import scipy.sparse as sp

from models.kernels import (NTKConfig, accelerated as _accelerated, ntk_from_dots,
                            ntk_from_dots_numpy, pad_rows, row_sq_norms)
from models.linalg import spd_solve
from models.metrics import METRIC_KEYS, RankingAccumulator, finish_evaluation, top_k_unseen

FULL_DATA_LAMBDAS: tuple[float, ...] = (0.0, 1.0, 5.0, 20.0, 50.0, 100.0)
SUMMARY_LAMBDAS: tuple[float, ...] = (1e-5, 1e-3, 0.1, 1.0, 5.0, 50.0)
# relative jitter (× trace(K)/n) that replaces λ̃ when K + λ̃I is numerically singular
STABILISING_JITTER = 1e-4
# history batches sparser than this are multiplied in sparse form (else densified for BLAS)
SPARSE_DOT_MAX_DENSITY = 0.005
# a batch of scores (rows × items, float32) stays under this size: wide catalogues score fewer
# users at a time, so memory does not grow with the catalogue (ML-1M's 3,706 items: no change)
SCORE_BATCH_BYTES = 256 * 2**20


def batch_rows(batch_size: int, n_items: int) -> int:
    """``batch_size``, lowered so that one batch of scores stays under :data:`SCORE_BATCH_BYTES`
    (at least 16 rows)."""
    return max(16, min(int(batch_size), SCORE_BATCH_BYTES // (4 * max(int(n_items), 1))))


def check_select_metric(select_metric: str, data: "EvalSet | None" = None) -> str:
    """``select_metric`` if it is one of :data:`models.metrics.METRIC_KEYS` (and, for ``auc``,
    ``data`` has AUC negatives); else ``ValueError``."""
    if select_metric not in METRIC_KEYS:
        raise ValueError(f"unknown selection metric {select_metric!r}; expected one of "
                         f"{', '.join(METRIC_KEYS)}")
    if select_metric == "auc" and data is not None and data.negatives is None:
        raise ValueError("selection metric 'auc' needs an evaluation set with AUC negatives")
    return select_metric


class SingularKernelWarning(UserWarning):
    """K + λ̃I was singular (e.g. λ = 0 with duplicate support rows); λ̃ was stabilised."""


def _dense32(matrix: Any) -> np.ndarray:
    if sp.issparse(matrix):
        # scatter the entries straight into a float32 array: several times faster than
        # ``toarray()`` (which builds the dense array in the sparse dtype first)
        coo = matrix.tocoo()
        out = np.zeros(coo.shape, dtype=np.float32)
        if coo.has_canonical_format:
            out[coo.row, coo.col] = coo.data
        else:  # duplicate entries add up, as in ``toarray()``
            np.add.at(out, (coo.row, coo.col), coo.data)
        return out
    return np.ascontiguousarray(matrix, dtype=np.float32)


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` in float32: NumPy's BLAS on a CPU, JAX at full float32 precision on a GPU/TPU."""
    if _accelerated():
        import jax
        import jax.numpy as jnp

        rows = a.shape[0]
        product = jnp.matmul(jnp.asarray(pad_rows(np.asarray(a, dtype=np.float32))), jnp.asarray(b),
                             precision=jax.lax.Precision.HIGHEST)
        return np.asarray(product)[:rows]
    return a @ b


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

    @functools.cached_property
    def _support_sq(self) -> np.ndarray:
        return row_sq_norms(self.support)

    @property
    def n_items(self) -> int:
        return self.support.shape[1]

    def cross_kernel(self, histories: Any) -> np.ndarray:
        """``k(histories, support)``: b × n (closed-form NTK, float32).

        Very sparse history batches are multiplied as they are; denser ones (interaction logs
        are ≈1–5% dense) are densified first, since a dense BLAS product is then faster.
        """
        if histories.shape[1] != self.n_items:
            raise ValueError(f"histories have {histories.shape[1]} items, the model has {self.n_items}")
        if sp.issparse(histories):
            h = sp.csr_matrix(histories, dtype=np.float32)
            if h.nnz <= SPARSE_DOT_MAX_DENSITY * h.shape[0] * h.shape[1] and not _accelerated():
                dots = np.asarray(h @ self._support_t)
            else:
                dots = _matmul(_dense32(h), self.support.T)
        else:
            h = _dense32(histories)
            dots = _matmul(h, self.support.T)
        sq = row_sq_norms(h)
        return ntk_from_dots(dots, sq, self._support_sq, self.n_items, self.config)

    @functools.cached_property
    def _support_t(self) -> np.ndarray:
        return np.ascontiguousarray(self.support.T)

    def scores(self, histories: Any) -> np.ndarray:
        """Raw scores ``k(h, X) α`` (b × m) for a batch of history rows (dense or sparse)."""
        return _matmul(self.cross_kernel(histories), self.alpha)

    def row_scorer(self, max_rows: int = 1024) -> "RowScorer":
        """The low-latency scorer of a few history rows at a time (the served path)."""
        return RowScorer(self, max_rows)

    def iter_scores(self, histories: Any, batch_size: int = 2048) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start_row, scores)`` over row batches so memory stays bounded (at most
        ``batch_size`` rows, fewer for a wide catalogue: :func:`batch_rows`)."""
        n = histories.shape[0]
        batch_size = batch_rows(batch_size, self.n_items)
        for start in range(0, n, batch_size):
            yield start, self.scores(histories[start : start + batch_size])

    def iter_scores_of_support_users(self, histories: Any, support_gram: np.ndarray,
                                     batch_size: int = 1024) -> Iterator[tuple[int, np.ndarray]]:
        """:meth:`iter_scores` for the support users themselves under changed histories.

        Row ``i`` of ``histories`` is support row ``i`` plus (or minus) a few interactions — the
        test context train + validation of a model fitted on every train user, say — and
        ``support_gram`` is ``X Xᵀ`` of the support. Then ``H Xᵀ = X Xᵀ + (H − X) Xᵀ`` where
        ``H − X`` is sparse: exact (integer-valued for binary data), without the n × m × n product.
        """
        n = self.support.shape[0]
        batch_size = batch_rows(batch_size, self.n_items)
        if histories.shape != self.support.shape:
            raise ValueError(f"histories are {histories.shape[0]} × {histories.shape[1]}, the support "
                             f"{n} × {self.n_items}: row i must be support user i")
        if support_gram.shape != (n, n):
            raise ValueError(f"support_gram is {support_gram.shape}, expected ({n}, {n})")
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            h = _dense32(histories[start:stop])
            edits = sp.csr_matrix(h - self.support[start:stop])
            dots = support_gram[start:stop] + np.asarray(edits @ self._support_t)
            kernel = ntk_from_dots(dots, row_sq_norms(h), self._support_sq, self.n_items, self.config)
            yield start, _matmul(kernel, self.alpha)

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


# up to this many rows a call runs in NumPy in the calling thread (gathered rows of Xᵀ summed, the
# kernel by ntk_from_dots_numpy: no XLA dispatch); more rows take SciPy's sparse × dense product
# and the jitted kernel on rows padded to a power of two (warmed shapes: 2·SMALL_ROWS … max_rows)
SMALL_ROWS = 8


class RowScorer:
    """Scores of a few binary history rows at a time, at low latency: the served model's path.

    Rows come as CSR parts (``indptr``, ``indices``: the columns of each row's items, each once),
    so no SciPy matrix is built per request. What does not depend on the rows is taken from the
    model once (Xᵀ contiguous, the support's norms, α in float32); per call, all in the calling
    thread: the dot products ``h·x_j`` as sums of gathered rows of Xᵀ (a request's histories are
    short: never densified), the kernel in NumPy (:func:`models.kernels.ntk_from_dots_numpy`: no
    XLA dispatch per request) and one BLAS product with α; a call of more than
    :data:`SMALL_ROWS` rows (a batch request) takes SciPy's sparse product and the jitted kernel
    instead, on rows padded to a power of two (shapes compiled by :meth:`warm`). A call takes at most ``max_rows`` rows
    (callers split larger batches; fewer for a wide catalogue, :func:`batch_rows`). On an
    accelerator it is :meth:`InfAE.scores`. The scores equal :meth:`InfAE.scores` of the same
    binary rows up to float32 rounding.
    """

    def __init__(self, model: InfAE, max_rows: int = 1024) -> None:
        self.model = model
        self.n_items = model.n_items
        self.max_rows = batch_rows(max_rows, model.n_items)
        self._support_t = model._support_t
        self._support_sq = model._support_sq
        self._alpha = model.alpha
        self._accelerated = _accelerated()
        from models.kernels import _jitted_ntk

        self._ntk = _jitted_ntk(int(model.n_items), model.config)

    def scores(self, indptr: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """``k(h, X) α`` (rows × m float32, a new array) of binary rows given as CSR parts (no
        empty row, no repeated column within a row), at most ``max_rows`` rows."""
        rows = len(indptr) - 1
        if rows > self.max_rows:
            raise ValueError(f"{rows} rows in one call; at most {self.max_rows}")
        if self._accelerated:
            return self.model.scores(self._csr(indptr, indices))
        sq = np.diff(indptr).astype(np.float32)  # binary rows: ‖h‖² is the number of items
        if rows <= SMALL_ROWS:
            dots = np.add.reduceat(self._support_t[indices], indptr[:-1], axis=0)
            kernel = ntk_from_dots_numpy(dots, sq, self._support_sq, self.n_items,
                                         self.model.config)
        else:
            dots = np.asarray(self._csr(indptr, indices) @ self._support_t, dtype=np.float32)
            padded = max(2 * SMALL_ROWS, 1 << (rows - 1).bit_length())  # a warmed shape
            if padded != rows:  # zero rows: finite kernel values (b_std > 0), cut off below
                dots = np.concatenate([dots, np.zeros((padded - rows, dots.shape[1]), np.float32)])
                sq = np.concatenate([sq, np.zeros(padded - rows, np.float32)])
            kernel = np.asarray(self._ntk(dots, sq, self._support_sq))[:rows]
        return kernel @ self._alpha

    def _csr(self, indptr: np.ndarray, indices: np.ndarray) -> sp.csr_matrix:
        return sp.csr_matrix((np.ones(len(indices), dtype=np.float32), indices, indptr),
                             shape=(len(indptr) - 1, self.n_items))

    def warm(self) -> None:
        """Compile the kernel for every row count a call pads to (2·``SMALL_ROWS`` … ``max_rows``,
        powers of two) and make a first one-row call (on an accelerator, the compilations of
        :meth:`InfAE.scores`)."""
        counts, rows = [1], 2 * SMALL_ROWS
        while rows < 2 * self.max_rows:
            counts.append(min(rows, self.max_rows))
            rows *= 2
        for rows in counts:
            self.scores(np.arange(rows + 1), np.zeros(rows, dtype=np.int64))


def kernel_matrix(support: Any, config: NTKConfig = NTKConfig(), *,
                  gram: np.ndarray | None = None) -> np.ndarray:
    """``K = k(X, X)`` (n × n, float32), computed once per support set (from ``gram`` if given)."""
    x = _dense32(support)
    sq = row_sq_norms(x)
    dots = support_gram(x) if gram is None else gram
    return ntk_from_dots(dots, sq, sq, x.shape[1], config)


def support_gram(support: Any) -> np.ndarray:
    """``X Xᵀ`` (n × n, float32): the dot products behind ``K``, reusable for scoring the
    support users under extended histories (:meth:`InfAE.iter_scores_of_support_users`)."""
    x = _dense32(support)
    return _matmul(x, x.T) if _accelerated() else x @ x.T  # NumPy turns X Xᵀ into one SYRK


def scaled_lambda(kernel: np.ndarray, lam: float) -> float:
    """λ̃ = λ · trace(K) / n (makes λ scale-free)."""
    return float(lam) * float(np.trace(kernel, dtype=np.float64)) / kernel.shape[0]


def solve_alpha(kernel: np.ndarray, targets: np.ndarray, lam: float, *,
                workspace: SolveWorkspace | None = None) -> tuple[np.ndarray, float]:
    """α = (K + λ̃ I)⁻¹ X by Cholesky; returns ``(α, λ̃ used)``.

    When ``K + λ̃I`` is not numerically positive definite in float32, :func:`solve_alpha_info`'s
    ladder stabilises it (a :class:`SingularKernelWarning` says how); never NaN. Past the ladder
    :class:`UnstableLambdaError` (a ``LinAlgError``) says which shifts were tried.
    ``workspace`` lends reusable buffers (a λ grid then allocates nothing per λ).
    """
    alpha, shift, how = solve_alpha_info(kernel, targets, lam, workspace=workspace)
    if how is not None:
        warnings.warn(_stabilised_message(kernel, lam, shift, how), SingularKernelWarning,
                      stacklevel=2)
    return alpha, shift


def _stabilised_message(kernel: np.ndarray, lam: float, shift: float, how: str) -> str:
    n = kernel.shape[0]
    return (f"K + λ̃I is not positive definite in float32 at λ={lam:g} (λ̃="
            f"{scaled_lambda(kernel, lam):.3g}, kernel {n} × {n}): "
            + ("solved in float64 at the same λ̃" if how == "float64"
               else f"stabilised with λ̃={shift:.3g}"))


def solve_alpha_info(kernel: np.ndarray, targets: np.ndarray, lam: float, *,
                     workspace: SolveWorkspace | None = None
                     ) -> tuple[np.ndarray, float, str | None]:
    """:func:`solve_alpha` without the warning: ``(α, λ̃ used, how)``.

    The ladder, first success kept: float32 Cholesky at λ̃ (``how`` None); float64 at the same
    λ̃ (``"float64"``: float32's rounding in the factorisation, not K, was the problem — measured
    on near-duplicate support rows, where K's smallest eigenvalue is ≈ 0 and float32 Cholesky
    breaks down at λ = 1e-5 while float64 does not); then λ̃ raised (``"shift"``) to
    ``STABILISING_JITTER · t`` (``t = trace(K)/n``) and ×10 at a time up to ``STABILISING_MAX · t``,
    in float64. λ = 0 on a singular K (duplicate rows) goes straight to the shifts.
    """
    lam_scaled = scaled_lambda(kernel, lam)
    alpha = _cholesky_solve(kernel, targets, lam_scaled, workspace)
    if alpha is not None and np.all(np.isfinite(alpha)):
        return alpha, lam_scaled, None
    scale = float(np.trace(kernel, dtype=np.float64)) / kernel.shape[0]
    shifts = stabilising_shifts(lam_scaled, scale)
    k64 = np.asarray(kernel, dtype=np.float64)
    x64 = np.asarray(targets, dtype=np.float64)
    for attempt, shift in enumerate(shifts):
        if attempt == 0 and lam_scaled == 0.0:
            continue  # λ = 0 failed: K itself is singular, more precision will not help
        alpha = spd_solve(k64, x64, shift=shift)
        if alpha is not None:
            return alpha.astype(np.float32), shift, "float64" if attempt == 0 else "shift"
    raise UnstableLambdaError(lam, shifts, kernel.shape[0])


# relative λ̃ bound (× trace(K)/n) up to which a failing λ is stabilised; beyond it, skipped
STABILISING_MAX = 1e-1


def stabilising_shifts(lam_scaled: float, scale: float) -> list[float]:
    """λ̃, then the raised shifts :func:`solve_alpha` tries when ``K + λ̃I`` is not definite."""
    shifts = [float(lam_scaled)]
    jitter, bound = STABILISING_JITTER * scale, STABILISING_MAX * scale
    shift = jitter if lam_scaled < jitter else lam_scaled * 10.0
    while shift <= bound * (1 + 1e-9) and scale > 0:
        shifts.append(shift)
        shift *= 10.0
    return shifts


class UnstableLambdaError(np.linalg.LinAlgError):
    """``K + λ̃I`` stayed not positive definite at every shift tried for one λ."""

    def __init__(self, lam: float, shifts: list[float], n: int) -> None:
        self.lam, self.shifts, self.n = float(lam), list(shifts), int(n)
        tried = ", ".join(f"{s:.3g}" for s in shifts)
        super().__init__(f"K + λ̃I is not positive definite at λ={lam:g} (kernel {n} × {n}; "
                         f"λ̃ tried: {tried})")


class LambdaGridError(ValueError):
    """Every λ of a grid failed (:class:`UnstableLambdaError` for each)."""


class SkippedLambdaWarning(UserWarning):
    """One λ of a grid could not be solved at any stabilising shift and was skipped."""


@dataclass
class SolveWorkspace:
    """Buffers reused across the solves of a λ grid: the factor, and spare α arrays.

    A solve takes a spare α buffer (or a new one); :meth:`give_back` returns an α that is no
    longer needed, so the next λ writes into it instead of allocating (and page-faulting) again.
    """

    factor: np.ndarray | None = None
    spare: list[np.ndarray] = field(default_factory=list)

    def factor_buffer(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """The buffer the factor is written to (made on first use, or for another shape)."""
        if self.factor is None or self.factor.shape != tuple(shape) or self.factor.dtype != dtype:
            self.factor = np.empty(shape, dtype=dtype)
        return self.factor

    def take(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray | None:
        while self.spare:
            buf = self.spare.pop()
            if buf.shape == tuple(shape) and buf.dtype == dtype:
                return buf
        return None

    def give_back(self, alpha: np.ndarray | None) -> None:
        if alpha is not None:
            self.spare.append(alpha)


def _cholesky_solve(kernel: np.ndarray, targets: np.ndarray, lam_scaled: float,
                    workspace: SolveWorkspace | None = None) -> np.ndarray | None:
    if _accelerated():
        import jax.numpy as jnp
        import jax.scipy.linalg as jsla

        a = jnp.asarray(kernel) + lam_scaled * jnp.eye(kernel.shape[0], dtype=jnp.float32)
        factor = jsla.cho_factor(a, lower=True)
        return np.asarray(jsla.cho_solve(factor, jnp.asarray(targets)))
    if workspace is None:
        return spd_solve(kernel, targets, shift=lam_scaled)
    dtype = np.result_type(kernel.dtype, np.float32)
    out = workspace.take(targets.shape, dtype)
    alpha = spd_solve(kernel, targets, shift=lam_scaled,
                      a_work=workspace.factor_buffer(kernel.shape, dtype), out=out)
    if alpha is None:
        workspace.give_back(out)
    return alpha


@dataclass
class EvalSet:
    """What one evaluation needs: context rows, target rows, seen mask, PSP weights, negatives."""

    context: sp.csr_matrix  # users × items, the rows the model reads
    targets: sp.csr_matrix  # users × items, the held-out items
    weights: np.ndarray  # PSP item weights
    negatives: np.ndarray | None = None  # users × 50 item ids for AUC
    seen: sp.csr_matrix | None = None  # defaults to context
    rows: np.ndarray | None = None  # a user sample: the row of each user in the full set
    population: int | None = None  # a user sample: users with targets in the full set

    def __post_init__(self) -> None:
        self.context = sp.csr_matrix(self.context, dtype=np.float32)
        self.targets = sp.csr_matrix(self.targets)
        self.seen = self.context if self.seen is None else sp.csr_matrix(self.seen)

    @property
    def n_users(self) -> int:
        """Users evaluated (those with at least one target)."""
        return int((np.diff(self.targets.indptr) > 0).sum())

    def subset(self, rows: np.ndarray | None) -> "EvalSet":
        """The same evaluation restricted to users ``rows`` (sorted row ids); ``None``: itself."""
        if rows is None:
            return self
        rows = np.asarray(rows, dtype=np.int64)
        return EvalSet(context=self.context[rows], targets=self.targets[rows], weights=self.weights,
                       negatives=None if self.negatives is None else self.negatives[rows],
                       seen=self.seen[rows], rows=rows, population=self.n_users)


# batches ranked at once by evaluate_score_batches (NumPy's partition/sort release the GIL)
EVAL_THREADS = max(1, min(2, os.cpu_count() or 1))


def evaluate_score_batches(batches: Iterable[tuple[int, np.ndarray]], data: EvalSet, k_max: int = 100,
                           *, threads: int | None = None,
                           metrics: Iterable[str] | None = None,
                           stats: dict[str, Any] | None = None) -> dict[str, float]:
    """Metrics from ``(start_row, scores)`` batches of a scorer over ``data``'s users.

    Each batch is ranked and scored on its own (``threads`` at a time, the next batch being made
    meanwhile) and the per-batch sums are added up in batch order, so the result does not depend
    on ``threads``. A batch's scores are overwritten (seen items masked in place); a producer
    that reuses buffers needs ``threads + 1`` of them.

    ``metrics``: the keys wanted (default: all). Only what they need is computed
    (:func:`evaluation_plan`), each value the same as in the full set: ``hr@k`` alone needs the
    unordered top-k sets, metrics at k = 10 alone the sorted top 10, AUC the raw scores of
    targets and negatives. A λ search ranks that little for the λ it does not keep.

    ``stats``: a dict to receive ``users`` (the number evaluated) and ``ci95`` (half-widths of the
    95% intervals, :meth:`models.metrics.RankingAccumulator.intervals`).
    """
    threads = EVAL_THREADS if threads is None else max(1, int(threads))
    plan = evaluation_plan(metrics, k_max)
    work = functools.partial(_batch_metrics, data=data, plan=plan)
    acc = RankingAccumulator(weights=data.weights, ks=plan.ks)
    if threads == 1:
        for start, scores in batches:
            acc.merge(work(start, scores))
    else:
        pending: collections.deque[Future[RankingAccumulator]] = collections.deque()
        with ThreadPoolExecutor(threads) as pool:
            for start, scores in batches:
                pending.append(pool.submit(work, start, scores))
                while len(pending) >= threads:
                    acc.merge(pending.popleft().result())
            while pending:
                acc.merge(pending.popleft().result())
    return finish_evaluation(acc, metrics, stats)


@dataclass(frozen=True)
class EvaluationPlan:
    """What :func:`evaluate_score_batches` computes for a set of wanted metrics."""

    ks: tuple[int, ...]  # cut-offs ranked (the longest list is max(ks))
    sort: bool  # False: unordered top-k sets, for a lone hit rate
    auc: bool  # pool target and negative scores for the AUC


def evaluation_plan(metrics: Iterable[str] | None, k_max: int = 100) -> EvaluationPlan:
    """The least work that gives ``metrics`` (None: all, at cut-offs 10 and ``k_max``).

    Every value is the one the full computation gives: the top-k lists are the first k items of
    the same tie-broken order (:func:`models.metrics.top_k_unseen`), and each metric at k only
    reads the first k of them.
    """
    full_ks = tuple(sorted({10, int(k_max)}))
    if metrics is None:
        return EvaluationPlan(ks=full_ks, sort=True, auc=True)
    wanted = set(metrics)
    ranking = {key for key in wanted if key != "auc"}
    ks = tuple(sorted({int(key.split("@", 1)[1]) for key in ranking})) or (min(full_ks),)
    if not set(ks) <= set(full_ks):
        raise ValueError(f"metrics {sorted(ranking)}: cut-offs other than {full_ks} are not computed")
    auc = "auc" in wanted
    if len(ranking) == 1 and next(iter(ranking)).startswith("hr@"):
        return EvaluationPlan(ks=ks, sort=False, auc=auc)
    return EvaluationPlan(ks=ks, sort=True, auc=auc)


def row_slice(data: EvalSet, start: int, stop: int) -> EvalSet:
    """Users ``start:stop`` of ``data`` as an evaluation set of their own (what one batch of
    :func:`evaluate_score_batches` reads), e.g. to score that batch on another machine."""
    return EvalSet(context=data.context[start:stop], targets=data.targets[start:stop],
                   weights=data.weights,
                   negatives=None if data.negatives is None else data.negatives[start:stop],
                   seen=data.seen[start:stop])


def batch_accumulator(scores: np.ndarray, data: EvalSet, plan: EvaluationPlan) -> RankingAccumulator:
    """The metric sums of one batch: ``scores`` (b × m, overwritten) of ``data``'s b users — the
    exact per-batch work of :func:`evaluate_score_batches` (merge the accumulators in batch order
    for its result)."""
    return _batch_metrics(0, scores, data, plan)


def _batch_metrics(start: int, scores: np.ndarray, data: EvalSet,
                   plan: EvaluationPlan) -> RankingAccumulator:
    part = RankingAccumulator(weights=data.weights, ks=plan.ks)
    stop = start + scores.shape[0]
    targets = data.targets[start:stop]
    seen = data.seen[start:stop]
    if plan.auc and data.negatives is not None:
        part.add_auc(scores, targets, data.negatives[start:stop])
    # the batch is ours to overwrite: mask seen items in place
    top = top_k_unseen(scores, seen, max(plan.ks), overwrite=True, sort=plan.sort)
    if not plan.sort:
        part.add_hit_rates({plan.ks[0]: top}, targets)
    else:
        part.add(top, targets)
    return part


def evaluate(model: InfAE, data: EvalSet, batch_size: int = 1024, *,
             support_gram: np.ndarray | None = None,
             stats: dict[str, Any] | None = None) -> dict[str, float]:
    """All metrics of ``model`` on ``data`` (batched scoring).

    ``support_gram`` (``X Xᵀ`` of the model's support) says that ``data``'s users are the support
    users themselves, row for row, with changed histories (test after a fit on all train users):
    their kernel rows then come from the Gram (:meth:`InfAE.iter_scores_of_support_users`).
    """
    if support_gram is not None:
        batches = model.iter_scores_of_support_users(data.context, support_gram, batch_size)
    else:
        batches = model.iter_scores(data.context, batch_size)
    return evaluate_score_batches(batches, data, stats=stats)


def _solve_recording(kernel: np.ndarray, x: np.ndarray, lam: float,
                     workspace: SolveWorkspace | None = None) -> tuple[np.ndarray, float, str | None]:
    """:func:`solve_alpha` (its warning included); returns ``(α, λ̃, how)`` — how it was
    stabilised (``"float64"``, ``"shift"``) or None."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SingularKernelWarning)
        alpha, lam_scaled, how = solve_alpha_info(kernel, x, lam, workspace=workspace)
        if how is not None:
            warnings.warn(_stabilised_message(kernel, lam, lam_scaled, how), SingularKernelWarning)
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=3)
    return alpha, lam_scaled, how


def _support_scores(x: np.ndarray, alpha: np.ndarray | None, lam_scaled: float,
                    batch_size: int, rows: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Scores ``K α = X − λ̃ α`` of the support rows themselves (``X`` when ``alpha`` is None),
    or of the support rows ``rows`` only (a user sample of them, in that order).

    Batches are written into a ring of ``EVAL_THREADS + 1`` reused buffers, enough for
    :func:`evaluate_score_batches` (which holds at most ``EVAL_THREADS`` batches while the next
    one is made).
    """
    n = x.shape[0] if rows is None else len(rows)
    m = x.shape[1]
    batch_size = batch_rows(batch_size, m)
    ring = [np.empty((min(batch_size, n), m), dtype=np.float32) for _ in range(min(EVAL_THREADS + 1,
                                                                                  -(-n // batch_size)))]
    for i, start in enumerate(range(0, n, batch_size)):
        stop = min(start + batch_size, n)
        take = slice(start, stop) if rows is None else rows[start:stop]
        out = ring[i % len(ring)][: stop - start]
        if alpha is None:
            np.copyto(out, x[take])
        else:
            np.multiply(alpha[take], np.float32(-lam_scaled), out=out)
            out += x[take]
        yield start, out


@dataclass
class LambdaResult:
    lam: float
    lam_scaled: float
    val: dict[str, float]
    stabilised: bool = False
    skipped: bool = False  # no stabilising shift made K + λ̃I definite: not evaluated, not kept
    seconds: float = 0.0  # solve and validation of this λ
    how: str | None = None  # stabilised by "float64" (same λ̃) or "shift" (λ̃ raised)

    @property
    def status(self) -> str:
        """``ok``; ``stabilised (float64)`` (same λ̃, float64 factorisation); ``stabilised``
        (λ̃ raised: see ``lam_scaled``); ``skipped``."""
        if self.skipped:
            return "skipped"
        if self.stabilised:
            return "stabilised (float64)" if self.how == "float64" else "stabilised"
        return "ok"


def fit_select(
    support: Any,
    val: EvalSet,
    lambdas: Iterable[float],
    config: NTKConfig = NTKConfig(),
    *,
    select_metric: str,
    support_is_val_context: bool = False,
    val_rows: np.ndarray | None = None,
    batch_size: int = 1024,
    kernel: np.ndarray | None = None,
    on_lambda: Callable[[LambdaResult], None] | None = None,
    path_metrics: Iterable[str] | None = None,
) -> tuple[InfAE, list[LambdaResult]]:
    """Fit ∞-AE for every λ of the grid (one K), keep the best on validation ``select_metric``.

    ``select_metric``: any of :data:`models.metrics.METRIC_KEYS` (``hr@100`` is the paper's rule;
    ties keep the first λ of the grid).
    ``support_is_val_context``: the support rows are exactly ``val.context`` (same users, same
    order) — then validation scores are ``X − λ̃α`` (exact, no extra matrix product).
    ``val_rows``: ``val.context`` is the support's rows ``val_rows`` (a user sample of the
    support users, :meth:`EvalSet.subset`) — the same shortcut for those rows.
    ``path_metrics``: the validation metrics reported for every λ (default: all); the kept λ
    always gets all of them, and ``select_metric`` is always among them. The λ not kept are
    ranked only for what these need (:func:`evaluation_plan`: ``("hr@100",)`` the unordered top
    100, ``("ndcg@10",)`` the top 10, no AUC), with the same values as in the full computation.
    A λ whose ``K + λ̃I`` is not definite even after stabilising (:func:`solve_alpha`) is
    skipped with a :class:`SkippedLambdaWarning` (``skipped`` in its path entry); when every λ
    is, :class:`LambdaGridError`.
    Returns the best model and the whole λ path (validation metrics of each λ).
    """
    check_select_metric(select_metric, val)
    x = _dense32(support)
    lambdas = list(lambdas)
    if not lambdas:
        raise ValueError("the λ grid is empty")
    batch_size = batch_rows(batch_size, x.shape[1])
    if support_is_val_context and val_rows is None:
        val_rows = None
        on_support = True
    else:
        on_support = val_rows is not None
        if on_support:
            val_rows = np.asarray(val_rows, dtype=np.int64)
            if len(val_rows) != val.context.shape[0]:
                raise ValueError(f"val_rows has {len(val_rows)} rows, the validation set "
                                 f"{val.context.shape[0]}")
    wanted = None if path_metrics is None else list(dict.fromkeys([*path_metrics, select_metric]))
    # ask for less only when that is less work; else every λ gets every metric (no re-scoring)
    reduced = wanted is not None and evaluation_plan(wanted) != evaluation_plan(None)
    if kernel is None:
        kernel = kernel_matrix(x, config)
    cross = None
    if not on_support:
        sup_sq = row_sq_norms(x)
        ctx = val.context

        def cross_batches() -> Iterator[tuple[int, np.ndarray]]:
            for start in range(0, ctx.shape[0], batch_size):
                h = _dense32(ctx[start : start + batch_size])
                yield start, ntk_from_dots(_matmul(h, x.T), row_sq_norms(h), sup_sq, x.shape[1], config)

        if ctx.shape[0] * x.shape[0] * 4 <= 512 * 2**20:  # cache k(C, X) when small (≤ 512 MB)
            cross = list(cross_batches())

    def score_batches(alpha: np.ndarray | None, lam_scaled: float) -> Iterator[tuple[int, np.ndarray]]:
        """Validation scores for one λ (``alpha`` None: λ = 0 on the validation users' support)."""
        if on_support:
            # K α = X − λ̃ α ; seen (support) items are masked, so the rest ranks by −α. For λ = 0,
            # K K⁻¹ X = X: the scores are the users' own rows (every unseen item ties at 0)
            return _support_scores(x, alpha, lam_scaled, batch_size, val_rows)
        source = cross if cross is not None else cross_batches()
        return ((s, _matmul(kb, alpha)) for s, kb in source)

    path: list[LambdaResult] = []
    best: LambdaResult | None = None
    best_alpha: np.ndarray | None = None  # None while the best λ is one that needed no solve
    best_value = -math.inf
    best_computed: dict[str, float] = {}
    workspace = SolveWorkspace()  # one factor buffer and ≤ 2 α buffers for the whole grid
    failures: list[UnstableLambdaError] = []
    for lam in lambdas:
        started = time.perf_counter()
        alpha: np.ndarray | None = None
        how = None
        lam_scaled = scaled_lambda(kernel, lam)
        # λ = 0 scored on the support needs no solve (exact, above) unless it is the λ kept
        if not (on_support and lam_scaled == 0.0):
            try:
                alpha, lam_scaled, how = _solve_recording(kernel, x, lam, workspace)
            except UnstableLambdaError as exc:
                failures.append(exc)
                warnings.warn(f"{exc}: λ={lam:g} skipped", SkippedLambdaWarning, stacklevel=2)
                result = LambdaResult(lam=float(lam), lam_scaled=lam_scaled, val={}, skipped=True,
                                      seconds=time.perf_counter() - started)
                path.append(result)
                if on_lambda is not None:
                    on_lambda(result)
                continue
        computed = evaluate_score_batches(score_batches(alpha, lam_scaled), val,
                                          metrics=wanted if reduced else None)
        metrics = computed if wanted is None else {k: computed[k] for k in wanted if k in computed}
        result = LambdaResult(lam=float(lam), lam_scaled=lam_scaled, val=metrics,
                              stabilised=how is not None, how=how,
                              seconds=time.perf_counter() - started)
        path.append(result)
        if on_lambda is not None:
            on_lambda(result)
        if metrics[select_metric] > best_value:
            best_value = metrics[select_metric]
            workspace.give_back(best_alpha)  # the previous best's α is free for the next λ
            best, best_alpha, best_computed = result, alpha, computed
        else:
            workspace.give_back(alpha)
    if best is None:
        raise LambdaGridError(
            f"no λ of the grid {[float(v) for v in lambdas]} gives a positive definite K + λ̃I "
            f"(kernel {kernel.shape[0]} × {kernel.shape[0]}, float32); last: {failures[-1]}")
    if reduced:  # the kept λ gets every metric, scored exactly as on the path
        best.val = evaluate_score_batches(score_batches(best_alpha, best.lam_scaled), val)
    elif wanted is not None:
        best.val = best_computed
    if best_alpha is None:  # the kept λ was scored without a solve (λ = 0): solve it now
        try:
            best_alpha, best.lam_scaled, best.how = _solve_recording(kernel, x, best.lam, workspace)
            best.stabilised = best.how is not None
        except UnstableLambdaError as exc:
            raise LambdaGridError(f"the kept λ={best.lam:g} cannot be solved: {exc}") from exc
    model = InfAE(support=x, alpha=best_alpha, lam=best.lam, lam_scaled=best.lam_scaled, config=config)
    return model, path
