"""∞-AE at scale: a kernel and top-k prediction in row blocks, with sparse histories.

For many users the work of prediction is, per batch of ``b`` history rows ``H`` (users × items,
CSR), against a fitted :class:`~models.infinite_ae.InfAE` with ``n`` support rows and ``m`` items:

1. cross dot products ``H Xᵀ`` (b × n): sparse CSR × dense ``Xᵀ`` — ``nnz(H)·n`` multiply-adds
   instead of the ``b·m·n`` of a densified batch (≈ 100× fewer at 1 % density);
2. the NTK elementwise on those dots (:func:`models.kernels.ntk_from_dots`, one fused XLA
   computation);
3. the dense score matmul ``k(H, X) α`` (b × n × m): the floor, in BLAS;
4. top-k with the seen items masked in place (:func:`models.metrics.top_k_unseen`).

Steps 1 and 2 are single-threaded kernels that release the GIL, so each batch is cut into row
chunks (≤ 1024 rows, at least ``threads`` of them) run side by side; step 3 uses BLAS's own
threads; step 4 holds the GIL and runs on 256-row slices of the batch (its int64 partition
indices stay ≈ 20 MB and are reused by malloc rather than faulted in afresh every batch).
Memory is bounded by the batch: about ``b·(8n + 4m)`` bytes (kernel chunks, one reused score
buffer) plus a fixed ``256·13m`` for top-k, on top of the model and one copy of ``Xᵀ``;
:func:`batch_rows_for` picks ``b`` for a byte budget.

:func:`blocked_kernel_matrix` computes ``K = k(X, X)`` the same way (sparse rows × dense ``Xᵀ``,
row blocks written into one n × n array), so a large user support needs no dense n × m × n
product and no n × n temporaries beyond ``K`` itself. :func:`fit_support` is that kernel plus the
existing Cholesky solve (:func:`models.infinite_ae.solve_alpha`) at one λ.

Pure NumPy/SciPy/JAX: no file I/O.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import scipy.sparse as sp

from models.infinite_ae import InfAE, solve_alpha
from models.kernels import NTKConfig, ntk_from_dots, row_sq_norms
from models.metrics import top_k_unseen

# Below this many rows a chunk is not worth a thread hand-off.
_MIN_CHUNK_ROWS = 256
# Rows per kernel chunk at most (dots + kernel of a chunk stay ≈ 2 × 20 MB at n = 5000).
_MAX_CHUNK_ROWS = 1024
# Rows per top-k call: top_k_unseen's int64 partition indices stay small (≈ 20 MB at m = 10k)
# and are reused by malloc instead of being faulted in afresh for every batch.
_TOP_K_ROWS = 256


def default_threads() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def batch_rows_for(n_support: int, n_items: int, max_bytes: int) -> int:
    """Rows per batch so one batch's working arrays stay within ``max_bytes``.

    Per row: float32 dots and kernel (``8 n``, counted whole though they live one chunk at a
    time) and float32 scores (``4 m``); top-k works on 256-row slices, whose int64 partition
    indices and NaN mask (``13 m`` per row) are a fixed extra.
    """
    fixed = _TOP_K_ROWS * 13 * n_items
    per_row = 8 * n_support + 4 * n_items
    return max(1, int((max_bytes - fixed) // per_row))


def _as_rows(histories: Any) -> Any:
    """CSR float32 for sparse input, C-contiguous float32 for dense input."""
    if sp.issparse(histories):
        h = sp.csr_matrix(histories)
        return h if h.dtype == np.float32 else h.astype(np.float32)
    return np.ascontiguousarray(histories, dtype=np.float32)


def _seen_mask(rows: Any) -> sp.csr_matrix:
    return rows if sp.issparse(rows) else sp.csr_matrix(rows)


class BlockedScorer:
    """Scores and top-k of a fitted :class:`InfAE` for many history rows, batch by batch.

    Holds ``Xᵀ`` contiguous (m × n float32, one extra copy of the support) so that a sparse batch
    ``H`` gives ``H Xᵀ`` with SciPy's CSR × dense kernel.
    """

    def __init__(self, model: InfAE, threads: int | None = None) -> None:
        self.model = model
        self.threads = default_threads() if threads is None else max(1, int(threads))
        self._support_t = np.ascontiguousarray(model.support.T)
        self._support_sq = row_sq_norms(model.support)  # as InfAE computes it
        self._pool: ThreadPoolExecutor | None = None
        # seconds spent per step, accumulated over calls (for profiling; wall clock)
        self.seconds: dict[str, float] = {"kernel": 0.0, "matmul": 0.0, "top_k": 0.0}

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> "BlockedScorer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _map(self, fn, spans: list[tuple[int, int]]) -> list[Any]:
        if len(spans) == 1:
            return [fn(*spans[0])]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="infae-block")
        return list(self._pool.map(lambda span: fn(*span), spans))

    def _spans(self, n_rows: int) -> list[tuple[int, int]]:
        parts = min(self.threads, max(1, n_rows // _MIN_CHUNK_ROWS))
        parts = max(parts, -(-n_rows // _MAX_CHUNK_ROWS))
        bounds = np.linspace(0, n_rows, parts + 1).astype(int)
        return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    # -- the steps ------------------------------------------------------------------------------

    def _ntk(self, dots: np.ndarray, sq: np.ndarray) -> np.ndarray:
        return ntk_from_dots(dots, sq, self._support_sq, self.model.n_items, self.model.config)

    def _kernel_chunks(self, rows: Any) -> list[tuple[int, int, np.ndarray]]:
        """``k(rows, X)`` as row chunks ``(start, stop, kernel)`` computed side by side."""
        if rows.shape[1] != self.model.n_items:
            raise ValueError(f"histories have {rows.shape[1]} items, the model has {self.model.n_items}")
        spans = self._spans(rows.shape[0])
        sq = row_sq_norms(rows)
        if sp.issparse(rows):
            # CSR × dense is one single-threaded SciPy kernel (GIL released): one per chunk
            def chunk(a: int, b: int) -> np.ndarray:
                return self._ntk(np.asarray(rows[a:b] @ self._support_t, dtype=np.float32), sq[a:b])
        else:
            dots = rows @ self._support_t  # dense: BLAS is threaded already

            def chunk(a: int, b: int) -> np.ndarray:
                return self._ntk(dots[a:b], sq[a:b])

        kernels = self._map(chunk, spans)
        return [(a, b, k) for (a, b), k in zip(spans, kernels)]

    def cross_kernel(self, histories: Any) -> np.ndarray:
        """``k(histories, support)``: b × n float32 (same values as :meth:`InfAE.cross_kernel`)."""
        rows = _as_rows(histories)
        chunks = self._kernel_chunks(rows)
        if len(chunks) == 1:
            return np.array(chunks[0][2], copy=True)
        return np.concatenate([k for _, _, k in chunks])

    def scores(self, histories: Any, out: np.ndarray | None = None) -> np.ndarray:
        """Raw scores ``k(h, X) α`` (b × m float32), writable; into ``out`` when given."""
        rows = _as_rows(histories)
        shape = (rows.shape[0], self.model.n_items)
        if out is None:
            out = np.empty(shape, dtype=np.float32)
        elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 array of shape {shape}")
        t0 = time.perf_counter()
        chunks = self._kernel_chunks(rows)
        t1 = time.perf_counter()
        for a, b, kernel in chunks:
            np.matmul(kernel, self.model.alpha, out=out[a:b])
        self.seconds["kernel"] += t1 - t0
        self.seconds["matmul"] += time.perf_counter() - t1
        return out

    def iter_top_k(
        self,
        histories: Any,
        k: int = 100,
        batch_size: int = 4096,
        *,
        seen: Any = None,
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield ``(start_row, items, scores)`` per batch: the ``k`` best unseen items, best first.

        ``seen`` (users × items) is masked before ranking; by default the histories themselves.
        Ties rank the lower item index first (as :func:`top_k_unseen`). If a row has fewer than
        ``k`` unseen items, its list ends with seen items scored ``-inf``.
        """
        rows = _as_rows(histories)
        seen_rows = _seen_mask(rows) if seen is None else sp.csr_matrix(seen)
        if seen_rows.shape != rows.shape:
            raise ValueError(f"seen has shape {seen_rows.shape}, histories {rows.shape}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        # one score buffer for every batch: the yielded top-k are copies, so it can be reused
        buffer = np.empty((min(batch_size, rows.shape[0]), self.model.n_items), dtype=np.float32)
        kk = min(k, self.model.n_items)
        for start in range(0, rows.shape[0], batch_size):
            stop = min(start + batch_size, rows.shape[0])
            scores = self.scores(rows[start:stop], out=buffer[: stop - start])
            t0 = time.perf_counter()
            top = np.empty((stop - start, kk), dtype=np.int64)
            best = np.empty((stop - start, kk), dtype=np.float32)
            for a in range(0, stop - start, _TOP_K_ROWS):
                b = min(a + _TOP_K_ROWS, stop - start)
                part = scores[a:b]
                top[a:b] = top_k_unseen(part, seen_rows[start + a : start + b], k, overwrite=True)
                best[a:b] = np.take_along_axis(part, top[a:b], axis=1)
            self.seconds["top_k"] += time.perf_counter() - t0
            yield start, top, best

    def recommend(
        self, histories: Any, k: int = 100, batch_size: int = 4096, *, seen: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` unseen items (int32) and their scores (float32) for every row, batched."""
        n = histories.shape[0]
        kk = min(k, self.model.n_items)
        items = np.empty((n, kk), dtype=np.int32)
        scores = np.empty((n, kk), dtype=np.float32)
        for start, top, val in self.iter_top_k(histories, k, batch_size, seen=seen):
            items[start : start + len(top)] = top
            scores[start : start + len(top)] = val
        return items, scores


def recommend_all(
    model: InfAE,
    histories: Any,
    k: int = 100,
    batch_size: int = 4096,
    *,
    seen: Any = None,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`BlockedScorer.recommend` in one call: ``(items n×k int32, scores n×k float32)``."""
    with BlockedScorer(model, threads=threads) as scorer:
        return scorer.recommend(histories, k, batch_size, seen=seen)


def iter_top_k(
    model: InfAE,
    histories: Any,
    k: int = 100,
    batch_size: int = 4096,
    *,
    seen: Any = None,
    threads: int | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """:meth:`BlockedScorer.iter_top_k` as a generator that owns its scorer."""
    with BlockedScorer(model, threads=threads) as scorer:
        yield from scorer.iter_top_k(histories, k, batch_size, seen=seen)


def blocked_kernel_matrix(
    support: Any,
    config: NTKConfig = NTKConfig(),
    *,
    block_rows: int = 4096,
    threads: int | None = None,
) -> np.ndarray:
    """``K = k(X, X)`` (n × n float32) in row blocks; equals :func:`kernel_matrix` of ``X``.

    With a sparse ``X`` each block's dots are CSR × dense ``Xᵀ`` (``nnz·n`` work instead of
    ``n²·m``); extra memory is one dense ``Xᵀ`` and one block of dots.
    """
    if sp.issparse(support):
        x_rows = sp.csr_matrix(support, dtype=np.float32)
        x_t = np.ascontiguousarray(x_rows.T.toarray(), dtype=np.float32)
    else:
        x_rows = np.ascontiguousarray(support, dtype=np.float32)
        x_t = np.ascontiguousarray(x_rows.T)
    n, m = x_rows.shape
    sq = row_sq_norms(x_rows)
    kernel = np.empty((n, n), dtype=np.float32)
    threads = default_threads() if threads is None else max(1, int(threads))
    pool = ThreadPoolExecutor(threads) if threads > 1 and sp.issparse(x_rows) else None

    def block(a: int, b: int) -> None:
        dots = np.asarray(x_rows[a:b] @ x_t, dtype=np.float32)
        kernel[a:b] = ntk_from_dots(dots, sq[a:b], sq, m, config)

    try:
        spans = [(s, min(s + block_rows, n)) for s in range(0, n, block_rows)]
        if pool is None:
            for a, b in spans:
                block(a, b)
        else:
            # split every block across the threads so each step keeps all cores busy
            sub = []
            for a, b in spans:
                bounds = np.linspace(a, b, threads + 1).astype(int)
                sub += [(int(p), int(q)) for p, q in zip(bounds[:-1], bounds[1:]) if q > p]
            list(pool.map(lambda span: block(*span), sub))
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    return kernel


def fit_support(
    support: Any,
    lam: float,
    config: NTKConfig = NTKConfig(),
    *,
    kernel: np.ndarray | None = None,
    block_rows: int = 4096,
    threads: int | None = None,
) -> InfAE:
    """∞-AE at one λ on ``support`` (sparse or dense rows): blocked ``K``, then Cholesky."""
    if kernel is None:
        kernel = blocked_kernel_matrix(support, config, block_rows=block_rows, threads=threads)
    x = support.toarray() if sp.issparse(support) else support
    x = np.ascontiguousarray(x, dtype=np.float32)
    alpha, lam_scaled = solve_alpha(kernel, x, lam)
    return InfAE(support=x, alpha=alpha, lam=float(lam), lam_scaled=lam_scaled, config=config)


__all__ = [
    "BlockedScorer",
    "batch_rows_for",
    "blocked_kernel_matrix",
    "default_threads",
    "fit_support",
    "iter_top_k",
    "recommend_all",
]
