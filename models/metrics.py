"""Ranking metrics of the ∞-AE paper, vectorised over users.

Definitions (``../shared/docs/algorithms.md``, "Evaluation"); for a user with target set ``T``
(``p = |T| ≥ 1``) and ranked list ``R`` (seen items removed):

* ``HR@k   = |R[:k] ∩ T| / min(p, k)``
* ``nDCG@k = Σ_{i<k, R[i]∈T} 1/log2(i+2) / Σ_{i<min(p,k)} 1/log2(i+2)``
* ``PSP@k  = [Σ_{i<k, R[i]∈T} w_{R[i]} / min(p, k)] / [Σ of the min(p, k) largest w_j, j ∈ T]``
  with propensity weights ``w_j = 1 + C (n_j + B)^(-A)``, ``A = 0.55``, ``B = 1.5``,
  ``C = (ln N − 1)(B + 1)^A`` (the reference divides only the numerator by ``min(p, k)``).
* ``AUC``: one global AUC over the pooled scores of every user's targets (label 1) and of their
  50 sampled negatives (label 0, items in neither their train nor test set), taken before seen
  items are masked.

Every metric but AUC is reported ×100, averaged over users with ``p ≥ 1``. No file I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import scipy.sparse as sp
from scipy.stats import rankdata

METRIC_KEYS: tuple[str, ...] = ("hr@10", "ndcg@10", "hr@100", "ndcg@100", "psp@10", "psp@100", "auc")
KS: tuple[int, ...] = (10, 100)
PSP_A = 0.55
PSP_B = 1.5
_PARTITION_ROWS = 128


def propensity_weights(train_counts: np.ndarray, n_train: int) -> np.ndarray:
    """PSP item weights ``w_j = 1 + C (n_j + B)^(-A)`` from per-item train counts ``n_j``."""
    counts = np.asarray(train_counts, dtype=np.float64)
    c = (np.log(n_train) - 1.0) * (PSP_B + 1.0) ** PSP_A
    return 1.0 + c * (counts + PSP_B) ** (-PSP_A)


def top_k_unseen(
    scores: np.ndarray, seen: sp.csr_matrix | None, k: int, *, overwrite: bool = False,
    sort: bool = True,
) -> np.ndarray:
    """Indices of the ``k`` best items per row of ``scores`` with ``seen`` items excluded.

    Rows are ranked by descending score, ties broken by the lower item index — also at the cut:
    the result is the first ``k`` items of that order, so ``top_k_unseen(s, seen, k)`` equals
    ``top_k_unseen(s, seen, K)[:, :k]`` for any ``K > k``. NaN scores rank last. ``scores`` is
    modified only if ``overwrite``. ``sort=False`` returns the same k items per row unordered (all
    a hit rate needs).
    """
    if overwrite and scores.dtype == np.float32 and scores.flags.writeable:
        s = scores
    else:
        s = np.array(scores, dtype=np.float32, copy=True)
    n, m = s.shape
    if seen is not None and seen.nnz:
        seen = seen.tocoo()
        s[seen.row, seen.col] = -np.inf
    nan = np.isnan(s)
    if nan.any():
        s[nan] = -np.inf
    k = min(k, m)
    if k < m:
        # a few rows at a time: argpartition's index array is rows × m int64, and small ones are
        # reused from the heap instead of being mapped (and page-faulted) afresh for every batch
        part = np.empty((n, k), dtype=np.intp)
        for r in range(0, n, _PARTITION_ROWS):
            part[r : r + _PARTITION_ROWS] = np.argpartition(s[r : r + _PARTITION_ROWS], m - k, axis=1)[:, m - k :]
        _lowest_index_at_the_cut(s, part)
    else:
        part = np.broadcast_to(np.arange(m), (n, m)).copy()
    if not sort:
        return part
    part_scores = np.take_along_axis(s, part, axis=1)
    # lexsort: last key is primary → sort by -score, then by item index
    order = np.lexsort((part, -part_scores), axis=1)
    return np.take_along_axis(part, order, axis=1)


def _lowest_index_at_the_cut(s: np.ndarray, part: np.ndarray) -> None:
    """Where items tied at a row's k-th score straddle the cut, keep the lowest-index ones.

    ``part`` (rows × k) holds the k items argpartition selected; a row needs fixing only when more
    than k items score at least its k-th score. Rewritten in place (rare: exact ties of float
    scores at the cut), so the selection no longer depends on the selection algorithm.
    """
    k = part.shape[1]
    kth = np.take_along_axis(s, part, axis=1).min(axis=1)
    tied = np.flatnonzero(np.count_nonzero(s >= kth[:, None], axis=1) > k)
    for row in tied:
        above = np.flatnonzero(s[row] > kth[row])
        at = np.flatnonzero(s[row] == kth[row])[: k - len(above)]
        part[row] = np.concatenate([above, at])


@dataclass
class RankingAccumulator:
    """Accumulates per-user metric sums batch by batch (so scores never need to be held whole)."""

    weights: np.ndarray
    ks: tuple[int, ...] = KS
    sums: dict[str, float] = field(default_factory=dict)
    sq_sums: dict[str, float] = field(default_factory=dict)  # Σ of squared per-user values
    n_users: int = 0
    pos_scores: list[np.ndarray] = field(default_factory=list)
    neg_scores: list[np.ndarray] = field(default_factory=list)

    def add_auc(self, raw_scores: np.ndarray, targets: sp.csr_matrix, negatives: np.ndarray) -> None:
        """Pool a batch's target scores (label 1) and negative scores (label 0), before masking."""
        targets = sp.csr_matrix(targets)
        keep = np.diff(targets.indptr) > 0
        coo = targets.tocoo()
        self.pos_scores.append(np.asarray(raw_scores[coo.row, coo.col], dtype=np.float64))
        negatives = negatives[keep]
        neg = np.take_along_axis(raw_scores[keep], np.maximum(negatives, 0), axis=1)
        self.neg_scores.append(neg[negatives >= 0].astype(np.float64))

    def add(
        self,
        ranked: np.ndarray,
        targets: sp.csr_matrix,
        raw_scores: np.ndarray | None = None,
        negatives: np.ndarray | None = None,
    ) -> None:
        """Add a batch: ``ranked`` (b × K item ids, best first, seen removed), ``targets`` (b × m).

        ``raw_scores`` (b × m, before masking) and ``negatives`` (b × 50 item ids) feed the AUC.
        """
        targets = sp.csr_matrix(targets)
        p = np.diff(targets.indptr)
        keep = p > 0
        if raw_scores is not None and negatives is not None:
            self.add_auc(raw_scores, targets, negatives)
        if not keep.any():
            return
        ranked = ranked[keep]
        targets = targets[keep]
        p = p[keep].astype(np.float64)
        hits = _hits(ranked, targets)
        discount = 1.0 / np.log2(np.arange(ranked.shape[1]) + 2.0)
        idcg_cum = np.cumsum(discount)
        # the largest weights among each user's targets, sorted descending, for the PSP ideal
        w_t = targets.multiply(self.weights[None, :]).tocsr()
        w_sorted = _row_sorted_desc(w_t, max(self.ks))
        w_cum = np.cumsum(w_sorted, axis=1)
        for k in self.ks:
            # a catalogue smaller than k ranks every item: R[:k] is then the whole list
            kk = min(k, ranked.shape[1])
            h = hits[:, :kk]
            denom = np.minimum(p, k)
            idx = denom.astype(np.int64) - 1
            hr = h.sum(axis=1) / denom
            ndcg = (h * discount[:kk]).sum(axis=1) / _ideal_dcg(idcg_cum, idx)
            gain = (h * self.weights[ranked[:, :kk]]).sum(axis=1) / denom
            psp = gain / w_cum[np.arange(len(idx)), idx]
            for name, vals in (("hr", hr), ("ndcg", ndcg), ("psp", psp)):
                self._add_values(f"{name}@{k}", vals)
        self.n_users += int(keep.sum())

    def add_hit_rates(self, top_sets: dict[int, np.ndarray], targets: sp.csr_matrix) -> None:
        """Add a batch's ``HR@k`` only, from each k's unordered top-k item sets (b × k).

        Equal to the ``hr@k`` that :meth:`add` gives for the same top-k items.
        """
        targets = sp.csr_matrix(targets)
        p = np.diff(targets.indptr)
        keep = p > 0
        if not keep.any():
            return
        targets = targets[keep]
        p = p[keep].astype(np.float64)
        for k, top in top_sets.items():
            hr = _hits(top[keep], targets).sum(axis=1) / np.minimum(p, k)
            self._add_values(f"hr@{k}", hr)
        self.n_users += int(keep.sum())

    def _add_values(self, key: str, vals: np.ndarray) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(vals.sum())
        self.sq_sums[key] = self.sq_sums.get(key, 0.0) + float(np.square(vals).sum())

    def merge(self, other: "RankingAccumulator") -> None:
        """Add another accumulator's sums (a later batch's: pooled AUC scores keep batch order)."""
        for key, value in other.sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        for key, value in other.sq_sums.items():
            self.sq_sums[key] = self.sq_sums.get(key, 0.0) + value
        self.n_users += other.n_users
        self.pos_scores.extend(other.pos_scores)
        self.neg_scores.extend(other.neg_scores)

    def result(self) -> dict[str, float]:
        """Means ×100 over users with targets, plus the pooled AUC (a fraction)."""
        if self.n_users == 0:
            raise ValueError("no user has a target item: nothing to evaluate")
        out = {key: 100.0 * self.sums[key] / self.n_users for key in self.sums}
        if self.pos_scores:
            out["auc"] = pooled_auc(np.concatenate(self.pos_scores), np.concatenate(self.neg_scores))
        return {key: out[key] for key in METRIC_KEYS if key in out}

    def intervals(self) -> dict[str, float]:
        """Half-widths of 95% confidence intervals of :meth:`result`'s values (same units).

        Per-user metrics: normal interval of a mean, ``1.96 · s / √n`` (``s`` the sample standard
        deviation over the ``n`` users). AUC: Hanley & McNeil's (1982) standard error of the pooled
        AUC. An interval says how far a figure on a user sample may lie from the figure on every
        user; 0 for a single user.
        """
        return mean_intervals(self.sums, self.sq_sums, self.n_users, self.pos_scores,
                              self.neg_scores)


Z95 = 1.959964  # two-sided 95% quantile of the standard normal


def mean_intervals(sums: dict[str, float], sq_sums: dict[str, float], n: int,
                   pos_scores: list[np.ndarray], neg_scores: list[np.ndarray]) -> dict[str, float]:
    """95% half-widths from per-user sums and sums of squares over ``n`` users (×100, as the
    metrics), and Hanley & McNeil's for the pooled AUC (:meth:`RankingAccumulator.intervals`)."""
    out: dict[str, float] = {}
    for key, total in sums.items():
        if n < 2:
            out[key] = 0.0
            continue
        mean = total / n
        var = max(sq_sums.get(key, 0.0) / n - mean * mean, 0.0) * n / (n - 1)
        out[key] = 100.0 * Z95 * float(np.sqrt(var / n))
    if pos_scores:
        pos, neg = np.concatenate(pos_scores), np.concatenate(neg_scores)
        out["auc"] = Z95 * auc_standard_error(pooled_auc(pos, neg), len(pos), len(neg))
    return {key: out[key] for key in METRIC_KEYS if key in out}


def finish_evaluation(acc: "RankingAccumulator", metrics: Iterable[str] | None = None,
                      stats: dict[str, Any] | None = None) -> dict[str, float]:
    """An evaluation's result from the merged accumulator of every batch (any accumulator with
    ``result()``, ``intervals()`` and ``n_users``): the ``metrics`` wanted (None: all), and in
    ``stats`` the users evaluated and the 95% half-widths."""
    result = acc.result()
    result = result if metrics is None else {key: result[key] for key in metrics if key in result}
    if stats is not None:
        ci = acc.intervals()
        stats.update(users=acc.n_users, ci95={key: ci[key] for key in result if key in ci})
    return result


def auc_standard_error(auc: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil's standard error of an AUC from ``n_pos`` positives, ``n_neg`` negatives."""
    q1, q2 = auc / (2.0 - auc), 2.0 * auc * auc / (1.0 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc))
    return float(np.sqrt(max(var, 0.0) / (n_pos * n_neg)))


def sample_users(targets: sp.spmatrix, max_users: int | None, seed: int) -> np.ndarray | None:
    """A fixed, seeded sample of at most ``max_users`` users who have targets (sorted row ids).

    ``None`` when every such user fits under the cap (``max_users`` None, or not exceeded): then
    every user is evaluated and every figure is the full one. The sample depends only on the
    rows that have targets, ``max_users`` and ``seed``, so every model evaluated on the same split
    with the same setting is scored on the same users.
    """
    if max_users is None:
        return None
    if max_users < 1:
        raise ValueError(f"max_users must be ≥ 1, got {max_users}")
    eligible = np.flatnonzero(np.diff(sp.csr_matrix(targets).indptr) > 0)
    if eligible.size <= max_users:
        return None
    rng = np.random.default_rng([int(seed), 0x5A17])
    return np.sort(rng.choice(eligible, size=int(max_users), replace=False))


def merge_top_k(best_items: np.ndarray | None, best_scores: np.ndarray | None,
                block_items: np.ndarray, block_scores: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """The running top-``k`` of two candidate lists per row (items and their scores).

    Order: descending score, ties by the lower item id — the order of :func:`top_k_unseen` — so
    merging the top-k of each item block of a catalogue (blocks in any order) gives exactly the
    top-k of the whole row. Returns ``(items, scores)``, best first, ``min(k, candidates)`` wide.
    """
    if best_items is None:
        items, scores = block_items, block_scores
    else:
        items = np.concatenate([best_items, block_items], axis=1)
        scores = np.concatenate([best_scores, block_scores], axis=1)
    order = np.lexsort((items, -scores), axis=1)[:, :k]
    return np.take_along_axis(items, order, axis=1), np.take_along_axis(scores, order, axis=1)


def top_k_tiled(score_block: Callable[[int, int], np.ndarray], n_items: int, seen: sp.spmatrix | None,
                k: int, *, item_block: int) -> np.ndarray:
    """:func:`top_k_unseen` of one user batch whose scores come in item blocks.

    ``score_block(lo, hi)`` returns the batch's scores of items ``lo:hi`` (b × (hi − lo)); only one
    block is held at a time besides the running top-k (b × k), so memory does not grow with the
    catalogue. Exactly the untiled result (same items, same order, same tie-breaking).
    """
    seen = None if seen is None else sp.csr_matrix(seen)
    best_items = best_scores = None
    for lo in range(0, n_items, item_block):
        hi = min(lo + item_block, n_items)
        block = np.array(score_block(lo, hi), dtype=np.float32, copy=True)
        if seen is not None and seen.nnz:
            part = seen[:, lo:hi].tocoo()
            block[part.row, part.col] = -np.inf
        block[np.isnan(block)] = -np.inf
        local = top_k_unseen(block, None, k, overwrite=True)
        local_scores = np.take_along_axis(block, local, axis=1)
        best_items, best_scores = merge_top_k(best_items, best_scores, local + lo, local_scores, k)
    assert best_items is not None, "an empty catalogue has no top-k"
    return best_items


def _hits(items: np.ndarray, targets: sp.csr_matrix) -> np.ndarray:
    """``hits[u, i] = items[u, i] ∈ T_u``, read from the sparse target rows without densifying."""
    rows = np.repeat(np.arange(items.shape[0]), items.shape[1])
    return np.asarray(targets[rows, items.ravel()]).reshape(items.shape) > 0


def _ideal_dcg(idcg_cum: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Σ_{i≤idx} 1/log2(i+2), also past the computed prefix (p > list length)."""
    if idx.size and idx.max() >= len(idcg_cum):
        idcg_cum = np.cumsum(1.0 / np.log2(np.arange(idx.max() + 1) + 2.0))
    return idcg_cum[idx]


def _row_sorted_desc(mat: sp.csr_matrix, width: int) -> np.ndarray:
    """Each row's stored values sorted descending, zero-padded to ``width`` columns."""
    n = mat.shape[0]
    out = np.zeros((n, width), dtype=np.float64)
    counts = np.diff(mat.indptr)
    if mat.nnz == 0:
        return out
    rows = np.repeat(np.arange(n), counts)
    order = np.lexsort((-mat.data, rows))
    pos = np.arange(mat.nnz) - np.repeat(mat.indptr[:-1], counts)
    ok = pos < width
    out[rows[ok], pos[ok]] = mat.data[order][ok]
    return out


def pooled_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Global AUC (Mann–Whitney, ties counted ½) of positive against negative scores."""
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUC needs at least one positive and one negative score")
    ranks = rankdata(np.concatenate([pos, neg]))
    n_pos, n_neg = len(pos), len(neg)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def sample_negatives(
    positives: sp.csr_matrix, n_neg: int, seed: int, batch_size: int = 1024
) -> np.ndarray:
    """``n_neg`` distinct items per user, drawn with a fixed seed among items not in ``positives``.

    ``positives`` (users × items) holds the interactions a negative must avoid. For the paper's
    AUC that is each user's train + test rows (``tasks.data.Dataset.negatives``): a negative is in
    neither their train nor test set, and a validation item may be one, as in the reference. Each
    user gets a uniform random subset (the ``n_neg`` smallest of i.i.d. uniform keys over the
    items not in their row). A user with fewer than ``n_neg`` such items (a small catalog) gets
    all of them, and the rest of the row is ``-1``; a catalog under ``n_neg`` items gives ``m`` columns (no negative; :meth:`RankingAccumulator.add_auc`
    skips it).
    """
    positives = sp.csr_matrix(positives)
    n, m = positives.shape
    n_neg = min(n_neg, m)
    rng = np.random.default_rng(seed)
    out = np.empty((n, n_neg), dtype=np.int64)
    for start in range(0, n, batch_size):
        block = positives[start : start + batch_size].tocoo()
        keys = rng.random((block.shape[0], m))
        keys[block.row, block.col] = np.inf
        part = np.argpartition(keys, n_neg - 1, axis=1)[:, :n_neg]
        part = np.sort(part, axis=1)
        taken = np.isinf(np.take_along_axis(keys, part, axis=1))  # a positive: fewer candidates
        part[taken] = -1
        out[start : start + block.shape[0]] = part
    return out


def evaluate_scores(
    scores: np.ndarray,
    targets: sp.csr_matrix,
    seen: sp.csr_matrix,
    weights: np.ndarray,
    negatives: np.ndarray | None = None,
    ks: tuple[int, ...] = KS,
) -> dict[str, float]:
    """All metrics for one dense score matrix (users × items). Convenience for small data."""
    acc = RankingAccumulator(weights=weights, ks=ks)
    if negatives is not None:
        acc.add_auc(scores, targets, negatives)
    acc.add(top_k_unseen(scores, seen, max(ks)), targets)
    return acc.result()
