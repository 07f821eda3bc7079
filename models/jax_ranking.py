"""Ranking and metrics in JAX, where the scores are: top-k, seen items masked, metric sums only.

The same definitions as :mod:`models.metrics` (``../shared/docs/algorithms.md``, "Evaluation"),
computed by one jitted function per user batch of a **fixed, padded shape**, so a whole
evaluation — every batch, every λ of a grid — runs one compiled program:

* ``scores`` (b × m) stay on the device; seen items are set to −∞ there (NaN ranks last too);
* the top ``K`` are exact, in :func:`models.metrics.top_k_unseen`'s order — descending score, ties
  by the lower item index, also at the cut. ``jax.lax.top_k`` does not document its order among
  equal values (XLA's GPU kernels need not keep the lower index first), so it is used only for the
  k-th largest *value*: the items above it, then the lowest-index items equal to it, are the
  top-k set; a second ``top_k`` over distinct integer keys lists that set by item index, and a
  k-wide sort by (−score, index) orders it. The result does not depend on how ``top_k`` breaks
  ties;
* HR/nDCG/PSP per user from the hits of that list; the parts that depend only on the targets —
  ``min(p, k)``, the ideal DCG, the PSP ideal (Σ of the ``min(p, k)`` largest target weights) —
  are computed once per evaluation set on the host, in float64, exactly as
  :class:`models.metrics.RankingAccumulator` does;
* only per-batch sums (and sums of squares, for the intervals) come back, plus — for the pooled
  AUC — the raw scores of each user's targets and 50 negatives (one global rank over all users is
  done on the host by :func:`models.metrics.pooled_auc`, so the AUC is the NumPy one).

Sparse rows travel as fixed-capacity coordinate lists (``rows``, ``cols``; padding points at row
``b``, dropped by the scatter), so no dense users × items matrix is shipped, and no jitted
function closes over a data set: every user-dependent array is an argument.

Per-user values are float32 on the device and their sums are added in float64 on the host: the
metrics equal the NumPy ones to ≈ 1e-6 relative; the ranked lists are identical.

Pure: no file I/O, no Prefect or MLflow. NumPy (:mod:`models.metrics`) stays the default path on
CPU; this one is for accelerators (and is tested against NumPy on CPU).
"""

from __future__ import annotations

import collections
import functools
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from jax import lax

from models.metrics import KS, METRIC_KEYS, finish_evaluation, mean_intervals, pooled_auc

# how many times each jitted function of this module (and of models.jax_infae) was traced: a new
# trace is a new compilation, so a test can check that a grid and its batches compile once
TRACES: collections.Counter[str] = collections.Counter()

# coordinate-list capacities are rounded up to a power of two (at least this), so evaluation sets
# of similar size share compiled programs
MIN_CAPACITY = 1024


def _capacity(n: int) -> int:
    return max(MIN_CAPACITY, 1 << max(0, int(n) - 1).bit_length())


# -- top-k --------------------------------------------------------------------------------------
def _clean(scores: jax.Array) -> jax.Array:
    return jnp.where(jnp.isnan(scores), -jnp.inf, scores)


def top_k_set(scores: jax.Array, k: int) -> jax.Array:
    """Item indices (b × k int32) of each row's ``k`` best items, by ascending item index.

    The set is exactly :func:`models.metrics.top_k_unseen`'s (ties at the cut: the lower item
    indices), whatever ``lax.top_k``'s tie order: ``top_k`` gives the k-th largest value; the
    items above it and those equal to it get distinct integer keys (above: ``3m − j``, equal:
    ``m − j``, others −1) whose ``top_k`` is every item above, then the lowest-index equal ones.
    ``scores`` must hold no NaN (see :func:`top_k_exact`); at most 5,592,405 items.
    """
    m = scores.shape[1]
    if 3 * m >= 2**24:
        raise ValueError(f"{m} items: the top-k keys would not be exact in float32")
    values, _ = lax.top_k(scores, k)
    # the k-th value as the minimum of the k (a slice of top_k's last column makes XLA:CPU take a
    # sort-based path, ≈ 15× slower)
    kth = jnp.min(values, axis=1, keepdims=True)
    # float32 keys (integers < 3m ≤ 2^24: exact): XLA's CPU top_k is a fast kernel for float32
    # only (integers go through a full sort)
    reverse = (m - lax.broadcasted_iota(jnp.int32, scores.shape, 1)).astype(jnp.float32)
    key = jnp.where(scores > kth, reverse + 2 * m, jnp.where(scores == kth, reverse, -1.0))
    keys, _ = lax.top_k(key, k)
    keys = keys.astype(jnp.int32)
    return jnp.where(keys > 2 * m, 3 * m - keys, m - keys)


def top_k_exact(scores: jax.Array, k: int) -> jax.Array:
    """Item indices (b × k int32) of each row's ``k`` best items, best first, ties by lower index.

    NaN scores rank last (as −∞). Equal to :func:`models.metrics.top_k_unseen` on the same scores
    (with the seen items already at −∞).
    """
    s = _clean(scores)
    k = min(int(k), s.shape[1])
    items = top_k_set(s, k)
    picked = jnp.take_along_axis(s, items, axis=1)
    # (−score, index) lexicographically; −(−inf) = +inf sorts last
    _, ordered = lax.sort((-picked, items), dimension=1, num_keys=2)
    return ordered


# -- one batch's metric sums -----------------------------------------------------------------------
def mask_coords(scores: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """``scores`` with ``(rows, cols)`` set to −∞ (padding rows point past the batch: dropped)."""
    return scores.at[rows, cols].set(-jnp.inf, mode="drop")


def batch_metric_sums(scores: jax.Array, arrays: dict[str, jax.Array], weights: jax.Array, *,
                      ks: tuple[int, ...], sort: bool, auc: bool) -> dict[str, jax.Array]:
    """Traceable: the metric sums of one batch (see the module docstring).

    ``arrays``: ``seen_rows, seen_cols, target_rows, target_cols`` (coordinate lists), ``p``
    (targets per user, 0 for padding rows), ``ideal_dcg`` and ``psp_ideal`` (b × len(ks)),
    ``negatives`` (b × 50, −1 = none) when ``auc``. Returns ``{"<metric>@k": Σ, "sq:<metric>@k":
    Σ², "users": n}`` and, with ``auc``, ``pos`` / ``pos_ok`` / ``neg`` / ``neg_ok``.
    """
    b, m = scores.shape
    raw = scores
    s = _clean(mask_coords(scores, arrays["seen_rows"], arrays["seen_cols"]))
    targets = jnp.zeros((b, m), dtype=jnp.bool_).at[
        arrays["target_rows"], arrays["target_cols"]].set(True, mode="drop")
    p = arrays["p"].astype(jnp.float32)
    keep = arrays["p"] > 0
    out: dict[str, jax.Array] = {"users": jnp.sum(keep, dtype=jnp.int32)}

    def add(name: str, values: jax.Array) -> None:
        values = jnp.where(keep, values, 0.0)
        out[name] = jnp.sum(values)
        out["sq:" + name] = jnp.sum(values * values)

    big = min(max(ks), m)
    if sort:
        items = top_k_exact(s, big)
        hits = jnp.take_along_axis(targets, items, axis=1).astype(jnp.float32)
        discount = 1.0 / jnp.log2(jnp.arange(big, dtype=jnp.float32) + 2.0)
        gains = hits * weights[items]
        for j, k in enumerate(ks):
            kk = min(k, m)
            denom = jnp.minimum(p, float(k))
            safe = jnp.where(keep, denom, 1.0)
            add(f"hr@{k}", jnp.sum(hits[:, :kk], axis=1) / safe)
            dcg = jnp.sum(hits[:, :kk] * discount[:kk], axis=1)
            add(f"ndcg@{k}", dcg / arrays["ideal_dcg"][:, j])
            add(f"psp@{k}", jnp.sum(gains[:, :kk], axis=1) / safe / arrays["psp_ideal"][:, j])
    else:
        for k in ks:
            items = top_k_set(s, min(k, m))
            n_hits = jnp.sum(jnp.take_along_axis(targets, items, axis=1), axis=1,
                             dtype=jnp.int32).astype(jnp.float32)
            add(f"hr@{k}", n_hits / jnp.where(keep, jnp.minimum(p, float(k)), 1.0))
    if auc:
        t_rows, t_cols = arrays["target_rows"], arrays["target_cols"]
        ok = t_rows < b
        out["pos"] = raw[jnp.minimum(t_rows, b - 1), t_cols]
        out["pos_ok"] = ok
        neg = arrays["negatives"]
        out["neg"] = jnp.take_along_axis(raw, jnp.maximum(neg, 0), axis=1)
        out["neg_ok"] = (neg >= 0) & keep[:, None]
    return out


@functools.lru_cache(maxsize=None)
def jitted_batch_metrics(ks: tuple[int, ...], sort: bool, auc: bool):
    """``fn(scores, arrays, weights) -> sums``: :func:`batch_metric_sums` jitted (one per plan)."""

    def fn(scores: jax.Array, arrays: dict[str, jax.Array], weights: jax.Array
           ) -> dict[str, jax.Array]:
        TRACES["batch_metrics"] += 1
        return batch_metric_sums(scores, arrays, weights, ks=ks, sort=sort, auc=auc)

    return jax.jit(fn)


# -- evaluation sets on the host -------------------------------------------------------------------
def _coords(mat: sp.csr_matrix, start: int, stop: int, b: int, capacity: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, columns and values of ``mat[start:stop]``, padded to ``capacity`` (padding: row
    ``b``, dropped by the scatters)."""
    lo, hi = mat.indptr[start], mat.indptr[stop]
    n = hi - lo
    rows = np.full(capacity, b, dtype=np.int32)
    cols = np.zeros(capacity, dtype=np.int32)
    vals = np.zeros(capacity, dtype=np.float32)
    rows[:n] = np.repeat(np.arange(stop - start, dtype=np.int32),
                         np.diff(mat.indptr[start : stop + 1]))
    cols[:n] = mat.indices[lo:hi]
    vals[:n] = mat.data[lo:hi]
    return rows, cols, vals


def _max_batch_nnz(mat: sp.csr_matrix, b: int) -> int:
    ends = np.minimum(np.arange(0, mat.shape[0], b) + b, mat.shape[0])
    starts = np.arange(0, mat.shape[0], b)
    return int((mat.indptr[ends] - mat.indptr[starts]).max()) if len(starts) else 0


@dataclass
class DeviceEvalSet:
    """An :class:`models.infinite_ae.EvalSet` cut into padded batches of ``batch`` users.

    Everything that depends only on the targets is computed here once (float64, then float32):
    ``p``, the ideal DCG and the PSP ideal of each user at each cut-off of ``ks``. Capacities of
    the coordinate lists are the largest batch's, rounded up to a power of two.
    """

    data: Any  # EvalSet
    batch: int
    ks: tuple[int, ...] = KS

    def __post_init__(self) -> None:
        d = self.data
        self.n_users, self.n_items = d.targets.shape
        self.targets = sp.csr_matrix(d.targets)
        self.targets.sort_indices()
        self.seen = sp.csr_matrix(d.seen)
        self.context = sp.csr_matrix(d.context)
        self.seen_is_context = d.seen is d.context
        b = self.batch
        self.seen_capacity = _capacity(_max_batch_nnz(self.seen, b))
        self.target_capacity = _capacity(_max_batch_nnz(self.targets, b))
        self.context_capacity = (self.seen_capacity if self.seen_is_context
                                 else _capacity(_max_batch_nnz(self.context, b)))
        self.n_batches = -(-self.n_users // b)
        p = np.diff(self.targets.indptr).astype(np.int64)
        self.p = p
        # ideal DCG and PSP ideal per user and cut-off: RankingAccumulator's float64 formulas
        width = max(self.ks)
        w_t = self.targets.multiply(np.asarray(d.weights)[None, :]).tocsr()
        from models.metrics import _row_sorted_desc  # the same helper as the NumPy path

        w_cum = np.cumsum(_row_sorted_desc(w_t, width), axis=1)
        disc_cum = np.cumsum(1.0 / np.log2(np.arange(max(width, int(p.max(initial=1)))) + 2.0))
        ideal = np.ones((self.n_users, len(self.ks)), dtype=np.float64)
        psp = np.ones((self.n_users, len(self.ks)), dtype=np.float64)
        has = p > 0
        for j, k in enumerate(self.ks):
            idx = np.minimum(p, k) - 1
            ideal[has, j] = disc_cum[idx[has]]
            psp[has, j] = w_cum[np.flatnonzero(has), idx[has]]
        self.ideal_dcg = ideal.astype(np.float32)
        self.psp_ideal = psp.astype(np.float32)
        self.weights = np.asarray(d.weights, dtype=np.float32)
        self.negatives = None if d.negatives is None else np.asarray(d.negatives)

    def batch_arrays(self, index: int, *, auc: bool, context: bool = False
                     ) -> dict[str, np.ndarray]:
        """The padded arrays of batch ``index`` (users ``index·batch`` …)."""
        b = self.batch
        start = index * b
        stop = min(start + b, self.n_users)
        rows = stop - start
        out: dict[str, np.ndarray] = {}
        out["seen_rows"], out["seen_cols"], _ = _coords(self.seen, start, stop, b,
                                                        self.seen_capacity)
        out["target_rows"], out["target_cols"], _ = _coords(self.targets, start, stop, b,
                                                            self.target_capacity)
        if context:
            if self.seen_is_context:
                out["context_rows"], out["context_cols"] = out["seen_rows"], out["seen_cols"]
                out["context_vals"] = _coords(self.context, start, stop, b,
                                              self.context_capacity)[2]
            else:
                (out["context_rows"], out["context_cols"],
                 out["context_vals"]) = _coords(self.context, start, stop, b, self.context_capacity)
        p = np.zeros(b, dtype=np.int32)
        p[:rows] = self.p[start:stop]
        out["p"] = p
        for name in ("ideal_dcg", "psp_ideal"):
            arr = np.ones((b, len(self.ks)), dtype=np.float32)
            arr[:rows] = getattr(self, name)[start:stop]
            out[name] = arr
        if auc:
            width = 1 if self.negatives is None else self.negatives.shape[1]
            neg = np.full((b, width), -1, np.int32)
            if self.negatives is not None:
                neg[:rows] = self.negatives[start:stop]
            out["negatives"] = neg
        return out


# -- accumulating on the host ----------------------------------------------------------------------
class DeviceAccumulator:
    """Adds the per-batch sums of :func:`batch_metric_sums` in float64 (batch order)."""

    def __init__(self, ks: tuple[int, ...]) -> None:
        self.ks = ks
        self.sums: dict[str, float] = {}
        self.sq_sums: dict[str, float] = {}
        self.n_users = 0
        self.pos: list[np.ndarray] = []
        self.neg: list[np.ndarray] = []

    def add(self, sums: dict[str, Any]) -> None:
        sums = jax.device_get(sums)
        self.n_users += int(sums["users"])
        for key, value in sums.items():
            if key.startswith("sq:"):
                self.sq_sums[key[3:]] = self.sq_sums.get(key[3:], 0.0) + float(value)
            elif "@" in key:
                self.sums[key] = self.sums.get(key, 0.0) + float(value)
        if "pos" in sums:
            self.pos.append(np.asarray(sums["pos"])[np.asarray(sums["pos_ok"])].astype(np.float64))
            self.neg.append(np.asarray(sums["neg"])[np.asarray(sums["neg_ok"])].astype(np.float64))

    def result(self) -> dict[str, float]:
        if self.n_users == 0:
            raise ValueError("no user has a target item: nothing to evaluate")
        out = {key: 100.0 * v / self.n_users for key, v in self.sums.items()}
        if self.pos:
            out["auc"] = pooled_auc(np.concatenate(self.pos), np.concatenate(self.neg))
        return {key: out[key] for key in METRIC_KEYS if key in out}

    def intervals(self) -> dict[str, float]:
        """As :meth:`models.metrics.RankingAccumulator.intervals`."""
        return mean_intervals(self.sums, self.sq_sums, self.n_users, self.pos, self.neg)


def finish(acc: DeviceAccumulator, metrics: Iterable[str] | None,
           stats: dict[str, Any] | None) -> dict[str, float]:
    return finish_evaluation(acc, metrics, stats)


def pad_batch(scores: Any, b: int) -> Any:
    """``scores`` (rows ≤ b) padded with zero rows to ``b`` (NumPy or JAX, as given)."""
    rows = scores.shape[0]
    if rows == b:
        return scores
    if isinstance(scores, np.ndarray):
        return np.concatenate([scores, np.zeros((b - rows, scores.shape[1]), scores.dtype)])
    return jnp.pad(scores, ((0, b - rows), (0, 0)))


def evaluate_score_batches_jax(batches: Iterable[tuple[int, Any]], data: Any, k_max: int = 100, *,
                               batch: int | None = None, metrics: Iterable[str] | None = None,
                               stats: dict[str, Any] | None = None,
                               prepared: DeviceEvalSet | None = None) -> dict[str, float]:
    """:func:`models.infinite_ae.evaluate_score_batches` with ranking and metrics in JAX.

    ``batches`` yields ``(start, scores)`` with ``start`` a multiple of ``batch`` (default: the
    first batch's rows) and at most ``batch`` rows (NumPy or JAX arrays; shorter ones are padded).
    ``prepared``: a :class:`DeviceEvalSet` of ``data`` to reuse (a λ grid prepares it once).
    """
    from models.infinite_ae import evaluation_plan

    plan = evaluation_plan(metrics, k_max)
    iterator: Iterator[tuple[int, Any]] = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise ValueError("no score batch")
    b = int(batch or (prepared.batch if prepared is not None else first[1].shape[0]))
    if prepared is None or prepared.batch != b or prepared.ks != plan.ks:
        prepared = DeviceEvalSet(data, b, plan.ks)
    auc = plan.auc and prepared.negatives is not None
    fn = jitted_batch_metrics(plan.ks, plan.sort, auc)
    weights = jnp.asarray(prepared.weights)
    acc = DeviceAccumulator(plan.ks)
    pending = None
    for start, scores in _chain(first, iterator):
        if start % b:
            raise ValueError(f"batch start {start} is not a multiple of the batch size {b}")
        sums = fn(pad_batch(scores, b), prepared.batch_arrays(start // b, auc=auc), weights)
        if pending is not None:  # read the previous batch's sums while this one computes
            acc.add(pending)
        pending = sums
    acc.add(pending)
    return finish(acc, metrics, stats)


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


__all__ = [
    "TRACES", "top_k_exact", "top_k_set", "batch_metric_sums", "jitted_batch_metrics",
    "DeviceEvalSet", "DeviceAccumulator", "evaluate_score_batches_jax", "pad_batch", "finish",
    "mask_coords",
]
