"""Sweeps as Prefect flows whose points are tasks mapped over a Dask cluster (prefect-dask).

* :func:`lambda_sweep` — ∞-AE at every λ of a grid (``tasks.sweep.lambda_point``), best λ by
  validation ``select_metric`` (the rule of ``models.infinite_ae.fit_select``);
* :func:`summary_sweep` — one summary per (budget, seed) (``tasks.sweep.summary_point``), ∞-AE
  fitted on each, per-budget statistics over the seeds.

:func:`dask_task_runner`: a local cluster (``workers`` workers, one thread each; processes or
threads) by default, an existing scheduler when ``address`` (``tcp://host:8786``) is given.
Dask worker *processes* run Prefect's task engine themselves and need a Prefect API: with a
server (``PREFECT_API_URL``) use processes; in ephemeral mode each worker process would start a
temporary server of its own, so threads are the default there (BLAS releases the GIL).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from prefect import flow, unmapped

from tasks.sweep import lambda_point, select_best, summarise_budgets, summary_point


@flow(name="infrec-lambda-sweep")
def lambda_sweep(data_dir: str, lambdas: list[float], depth: int = 1,
                 support_path: Optional[str] = None, user_support: Optional[float] = None,
                 seed: int = 0, batch_size: int = 2048, *,
                 select_metric: str) -> dict[str, Any]:
    futures = lambda_point.map(data_dir, lambdas, unmapped(depth), unmapped(support_path),
                               unmapped(user_support), unmapped(seed), unmapped(batch_size))
    path = [f.result() for f in futures]  # grid order
    best = select_best(path, select_metric)
    return {"data_dir": data_dir, "select_metric": select_metric, "best_lambda": best["lambda"],
            "best_val": best["val"], "support": best["support"],
            "path": [{k: v for k, v in p.items() if k != "support"} for p in path]}


@flow(name="infrec-summary-sweep")
def summary_sweep(data_dir: str, out_dir: str, sampler: str, budgets: list[int], seeds: list[int],
                  options: Optional[dict[str, Any]] = None, *,
                  select_metric: str) -> dict[str, Any]:
    grid = [(b, s) for b in budgets for s in seeds]
    futures = summary_point.map(data_dir, unmapped(out_dir), unmapped(sampler),
                                [b for b, _ in grid], [s for _, s in grid], unmapped(options))
    points = [f.result() for f in futures]
    return {"data_dir": data_dir, "sampler": sampler, "select_metric": select_metric,
            "points": points, "by_budget": summarise_budgets(points, select_metric),
            "best": select_best(points, select_metric)}


def default_processes() -> bool:
    """Worker processes when a Prefect server is configured, threads in ephemeral mode."""
    return bool(os.environ.get("PREFECT_API_URL"))


def dask_task_runner(address: Optional[str] = None, workers: int = 2,
                     processes: Optional[bool] = None) -> Any:
    """A ``DaskTaskRunner``: the scheduler at ``address``, else a local loopback cluster."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    processes = default_processes() if processes is None else processes
    kwargs: dict[str, Any] = {"n_workers": int(workers), "threads_per_worker": 1,
                              "processes": processes, "dashboard_address": None}
    if processes:
        kwargs["host"] = "127.0.0.1"
    return DaskTaskRunner(cluster_kwargs=kwargs)


def run_lambda_sweep(data_dir: str | Path, lambdas: Sequence[float], *,
                     address: Optional[str] = None, workers: int = 2,
                     processes: Optional[bool] = None, **options: Any) -> dict[str, Any]:
    runner = dask_task_runner(address, workers, processes)
    return lambda_sweep.with_options(task_runner=runner)(
        str(Path(data_dir).resolve()), [float(v) for v in lambdas], **options)


def run_summary_sweep(data_dir: str | Path, out_dir: str | Path, sampler: str,
                      budgets: Sequence[int], seeds: Sequence[int], *,
                      address: Optional[str] = None, workers: int = 2,
                      processes: Optional[bool] = None, **options: Any) -> dict[str, Any]:
    runner = dask_task_runner(address, workers, processes)
    return summary_sweep.with_options(task_runner=runner)(
        str(Path(data_dir).resolve()), str(Path(out_dir).resolve()), sampler,
        [int(b) for b in budgets], [int(s) for s in seeds], **options)
