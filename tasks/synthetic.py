"""A small, deterministic, realistic implicit-feedback data set (no download needed).

Generative model (all draws from ``numpy.random.default_rng(seed)``):

- item popularity: Zipf-like, ``pop_j ∝ rank_j^-0.9`` with ranks randomly assigned to items;
- user activity: lognormal (median ≈ 25), rounded, clipped to [5, n_items // 2];
- tastes: users and items have ``rank``-dimensional Gaussian latent factors; user u picks
  ``n_u`` distinct items, without replacement, with probability ∝ ``pop_j^a · exp(s · <p_u, q_j>)``
  (Gumbel top-k sampling, exact for sampling without replacement proportionally to weights);
  the taste term is strong enough that a personalised model clearly beats popularity;
- timestamps: per user, a start time in 2000–2003 plus increasing exponential gaps (≈ 1 day).

Raw ids are not contiguous: users are ``1000 + u``, items ``7 j + 3``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from tasks.errors import InputError
from tasks.io import atomic_file

_ZIPF = 0.9          # popularity exponent over item ranks
_POP_WEIGHT = 1.0    # a in pop^a
_TASTE_SCALE = 2.0   # s: standard deviation of the taste score <p_u, q_j> * s
_MEDIAN_ACTIVITY = 25.0
_ACTIVITY_SIGMA = 0.9
_MIN_ACTIVITY = 5
_T0 = 946_684_800    # 2000-01-01
_BLOCK = 1 << 21     # user-item scores per block (memory bound; fixed so output is machine-independent)


def generate_interactions(n_users: int = 3000, n_items: int = 1000, seed: int = 0, rank: int = 8) -> pl.DataFrame:
    """Return ``user_id, item_id, timestamp`` (Int64), sorted by user then timestamp."""
    if n_users < 2:
        raise InputError(f"generate: need at least 2 users, got {n_users}")
    if n_items < 2 * _MIN_ACTIVITY:
        raise InputError(f"generate: need at least {2 * _MIN_ACTIVITY} items, got {n_items}")
    if rank < 1:
        raise InputError(f"generate: rank must be >= 1, got {rank}")
    rng = np.random.default_rng(seed)

    item_rank = rng.permutation(n_items) + 1
    log_pop = -_ZIPF * np.log(item_rank.astype(np.float64))
    log_pop -= log_pop.max()
    p = rng.standard_normal((n_users, rank))
    q = rng.standard_normal((n_items, rank))
    scale = _TASTE_SCALE / np.sqrt(rank)  # <p_u, q_j> has variance rank
    activity = np.rint(rng.lognormal(np.log(_MEDIAN_ACTIVITY), _ACTIVITY_SIGMA, n_users)).astype(np.int64)
    activity = np.clip(activity, _MIN_ACTIVITY, n_items // 2)

    chosen: list[np.ndarray] = []
    block = max(1, _BLOCK // n_items)
    cols = np.arange(n_items)
    for start in range(0, n_users, block):
        stop = min(n_users, start + block)
        logits = _POP_WEIGHT * log_pop[None, :] + scale * (p[start:stop] @ q.T)
        keys = logits + rng.gumbel(size=logits.shape)
        kmax = int(activity[start:stop].max())
        top = np.argpartition(-keys, kmax - 1, axis=1)[:, :kmax]
        top_keys = np.take_along_axis(keys, top, axis=1)
        top = np.take_along_axis(top, np.argsort(-top_keys, axis=1, kind="stable"), axis=1)
        mask = cols[None, :kmax] < activity[start:stop, None]
        chosen.append(top[mask])
    items = np.concatenate(chosen)
    users = np.repeat(np.arange(n_users), activity)

    starts = rng.integers(0, 3 * 365 * 86_400, n_users)
    gaps = rng.exponential(86_400.0, items.size).astype(np.int64) + 1
    csum = np.cumsum(gaps)
    offsets = np.concatenate(([0], np.cumsum(activity)[:-1]))
    before = np.concatenate(([0], csum))[offsets]
    timestamps = _T0 + starts[users] + csum - np.repeat(before, activity)

    return pl.DataFrame(
        {
            "user_id": (1000 + users).astype(np.int64),
            "item_id": (7 * items + 3).astype(np.int64),
            "timestamp": timestamps.astype(np.int64),
        }
    )


def write_synthetic(out_path, n_users: int = 3000, n_items: int = 1000, seed: int = 0) -> dict:
    """Write the synthetic data set as CSV (``user_id,item_id,timestamp``) atomically."""
    return _write_csv(out_path, generate_interactions(n_users=n_users, n_items=n_items, seed=seed))


def _write_csv(out_path, df: pl.DataFrame) -> dict:
    """``df`` as CSV at ``out_path``, atomically (temporary sibling, then rename); its stats."""
    out_path = Path(out_path)
    if out_path.is_dir():
        raise InputError(f"{out_path}: is a directory, expected a CSV file path")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{out_path}: cannot create the parent directory: {exc.strerror or exc}") from None
    try:
        with atomic_file(out_path) as tmp:
            df.write_csv(tmp)
    except OSError as exc:
        raise InputError(f"{out_path}: cannot write: {exc.strerror or exc}") from None
    return {
        "path": str(out_path),
        "rows": df.height,
        "users": df.get_column("user_id").n_unique(),
        "items": df.get_column("item_id").n_unique(),
    }


# -- a small dense log of low-rank tastes plus popularity (the "900 × 400" kind) --------------
def generate_taste_popularity(n_users: int = 900, n_items: int = 400, seed: int = 0, *,
                              rank: int = 6, taste: float = 2.0, zipf: float = 1.0,
                              median_activity: float = 40.0) -> pl.DataFrame:
    """A small, dense log of low-rank tastes plus popularity: ``user_id, item_id, timestamp``.

    All draws from ``numpy.random.default_rng(seed)``, in this order: item popularity ranks (a
    permutation; ``pop_j ∝ rank_j^-zipf``), user and item factors (``rank``-dimensional standard
    Gaussians), user activity (lognormal, median ``median_activity``, σ 0.6, rounded and clipped
    to [5, n_items // 4]), the Gumbel keys that pick each user's ``n_u`` distinct items without
    replacement with probability ∝ ``pop_j · exp(taste · <p_u, q_j> / √rank)``, then timestamps
    (per user a start in 2000–2003 plus exponential gaps of ≈ 1 day). Unlike
    :func:`generate_interactions` the catalogue is small and each user holds ≈ 10% of it, so
    HR@100 is nearly saturated while nDCG@10 still separates models. Raw ids: users ``5000 + u``,
    items ``11 j + 2``; sorted by user then timestamp.
    """
    if n_users < 2:
        raise InputError(f"generate: need at least 2 users, got {n_users}")
    if n_items < 4 * _MIN_ACTIVITY:
        raise InputError(f"generate: need at least {4 * _MIN_ACTIVITY} items, got {n_items}")
    if rank < 1:
        raise InputError(f"generate: rank must be >= 1, got {rank}")
    rng = np.random.default_rng(seed)
    item_rank = rng.permutation(n_items) + 1
    log_pop = -float(zipf) * np.log(item_rank.astype(np.float64))
    p = rng.standard_normal((n_users, rank))
    q = rng.standard_normal((n_items, rank))
    activity = np.rint(rng.lognormal(np.log(median_activity), 0.6, n_users)).astype(np.int64)
    activity = np.clip(activity, _MIN_ACTIVITY, n_items // 4)
    logits = log_pop[None, :] + (float(taste) / np.sqrt(rank)) * (p @ q.T)
    keys = logits + rng.gumbel(size=logits.shape)
    order = np.argsort(-keys, axis=1, kind="stable")
    mask = np.arange(n_items)[None, :] < activity[:, None]
    items = order[mask]  # row-major: each user's picks, best key first
    users = np.repeat(np.arange(n_users), activity)

    starts = rng.integers(0, 3 * 365 * 86_400, n_users)
    gaps = rng.exponential(86_400.0, items.size).astype(np.int64) + 1
    csum = np.cumsum(gaps)
    offsets = np.concatenate(([0], np.cumsum(activity)[:-1]))
    before = np.concatenate(([0], csum))[offsets]
    timestamps = _T0 + starts[users] + csum - np.repeat(before, activity)
    return pl.DataFrame({
        "user_id": (5000 + users).astype(np.int64),
        "item_id": (11 * items + 2).astype(np.int64),
        "timestamp": timestamps.astype(np.int64),
    })


def write_taste_popularity(out_path, n_users: int = 900, n_items: int = 400, seed: int = 0,
                           **options) -> dict:
    """Write :func:`generate_taste_popularity` as CSV (``user_id,item_id,timestamp``) atomically."""
    return _write_csv(out_path, generate_taste_popularity(n_users, n_items, seed, **options))
