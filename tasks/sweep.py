"""Sweep tasks: one point of the λ grid, or one (sampler, budget, seed) summary, of a data dir.

Each point is independent, so a sweep maps them over a Prefect task runner (``flows/sweep.py``,
Dask). The maths is the sequential code's, called on one point:

* :func:`evaluate_lambda` — :func:`models.infinite_ae.fit_select` on a one-λ grid, with the kernel
  ``K`` (:func:`models.infinite_ae.kernel_matrix`) computed once per worker process and support
  (cached) — exactly the λ path of ``fit_select`` on the whole grid, point by point;
* :func:`evaluate_summary` — :func:`tasks.distill.distill_dataset` for one (sampler, budget, seed):
  the summary file, its λ and its validation metrics;
* :func:`select_best` — the rule of ``fit_select``: the first point with the highest value of
  ``select_metric`` in grid order.

Tasks take and return paths, numbers and small dicts (never arrays): they run on Dask workers,
possibly on other machines, which read the data directory themselves (shared or synced storage).
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.errors import InputError

_PREPARE_LOCK = threading.Lock()


@functools.lru_cache(maxsize=2)
def _prepared(data_dir: str, stamp: int, support_path: Optional[str], user_support: Optional[float],
              seed: int, depth: int) -> tuple[Any, ...]:
    """(support, K, validation set, support_is_val_context, support description, kernel config)
    — once per worker process and support (``stamp``: the manifest's mtime, so new data reloads)."""
    from models.infinite_ae import kernel_matrix
    from models.kernels import NTKConfig
    from tasks.data import load_dataset
    from tasks.fit import choose_support

    dataset = load_dataset(data_dir)
    support, info, is_ctx = choose_support(dataset, support_path=support_path,
                                           user_support=user_support, seed=seed)
    config = NTKConfig(depth=depth)
    return support, kernel_matrix(support, config), dataset.val_set(), is_ctx, info, config


def _stamp(data_dir: str) -> int:
    manifest = Path(data_dir) / "manifest.json"
    if not manifest.is_file():
        raise InputError(f"{data_dir}: not a data directory (run `infrec ingest` first)")
    return manifest.stat().st_mtime_ns


def evaluate_lambda(data_dir: str, lam: float, *, depth: int = 1,
                    support_path: Optional[str] = None, user_support: Optional[float] = None,
                    seed: int = 0, batch_size: int = 2048) -> dict[str, Any]:
    """∞-AE at one λ on ``data_dir``'s support (all users, a user sample or a summary file):
    ``{"lambda", "lambda_scaled", "stabilised", "val": {metric: value}, "support"}``."""
    from models.infinite_ae import fit_select

    data_dir = str(Path(data_dir).resolve())
    key = (data_dir, _stamp(data_dir), None if support_path is None else str(support_path),
           user_support, int(seed), int(depth))
    with _PREPARE_LOCK:  # threads of one worker share one K
        support, kernel, val, is_ctx, info, config = _prepared(*key)
    _, path = fit_select(support, val, [float(lam)], config, support_is_val_context=is_ctx,
                         batch_size=batch_size, kernel=kernel, select_metric="hr@100")
    point = path[0]
    return {"lambda": point.lam, "lambda_scaled": point.lam_scaled,
            "stabilised": point.stabilised, "val": dict(point.val),
            "support": {k: v for k, v in info.items() if k != "meta"}}


def evaluate_summary(data_dir: str, out_dir: str, sampler: str, budget: int, seed: int,
                     options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """One summary of the (budget, seed) grid, written to ``out_dir``, and ∞-AE fitted on it
    (λ on validation): ``{"sampler", "budget", "seed", "lambda", "val", "summary_path", ...}``."""
    from tasks.distill import distill_dataset

    out = Path(out_dir) / f"summary-{sampler}-b{int(budget)}-s{int(seed)}.parquet"
    report = distill_dataset(data_dir, out, sampler=sampler, budget=int(budget), seed=int(seed),
                             log_path=out.with_suffix(".log.jsonl"),
                             **(options or {}))
    return {"sampler": sampler, "budget": int(budget), "seed": int(seed),
            "lambda": report["lambda"], "val": dict(report["val"]), "summary_path": str(out),
            "steps_run": report.get("steps_run"), "seconds": report.get("seconds")}


def select_best(points: Sequence[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The first point with the highest ``val[metric]`` (``fit_select``'s rule)."""
    best, best_value = None, float("-inf")
    for point in points:
        value = point["val"][metric]
        if value > best_value:
            best, best_value = point, value
    if best is None:
        raise ValueError(f"no point has a finite {metric}")
    return best


def summarise_budgets(points: Sequence[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Per budget: mean, min and max of ``val[metric]`` over the seeds."""
    import numpy as np

    out = []
    for budget in sorted({p["budget"] for p in points}):
        values = np.array([p["val"][metric] for p in points if p["budget"] == budget])
        out.append({"budget": budget, "seeds": int(values.size), "mean": float(values.mean()),
                    "min": float(values.min()), "max": float(values.max())})
    return out


_TASK = dict(cache_policy=NO_CACHE, persist_result=False)


@task(name="sweep-lambda", **_TASK)
def lambda_point(data_dir: str, lam: float, depth: int = 1, support_path: Optional[str] = None,
                 user_support: Optional[float] = None, seed: int = 0,
                 batch_size: int = 2048) -> dict[str, Any]:
    return evaluate_lambda(data_dir, lam, depth=depth, support_path=support_path,
                           user_support=user_support, seed=seed, batch_size=batch_size)


@task(name="sweep-summary", **_TASK)
def summary_point(data_dir: str, out_dir: str, sampler: str, budget: int, seed: int,
                  options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    return evaluate_summary(data_dir, out_dir, sampler, budget, seed, options)


__all__ = ["evaluate_lambda", "evaluate_summary", "select_best", "summarise_budgets",
           "lambda_point", "summary_point"]
