"""Fit stage: ∞-AE on the summary (the candidate), λ chosen on validation, evaluated on test.

``run(params)`` reads ``<state_dir>/data/processed`` and ``<state_dir>/data/summary.parquet``,
fits ∞-AE on the summary for every λ of ``fit.summary_lambdas`` (one kernel), keeps the λ with
the best validation ``selection.metric``, evaluates it on test and writes

* ``<state_dir>/model`` — the model directory (:mod:`tasks.model_store`);
* ``<reports_dir>/metrics.json`` — ``{"lambda", "val": {…}, "test": {…}}`` (DVC metrics);
* ``<reports_dir>/lambda_path.json`` and ``plots/lambda_path.png`` — metric versus λ.

:func:`fit_dataset` is the same fit on any support (all users, a user sample, a summary file):
the evaluate stage's full-data reference and the sweeps use it. Entry points: :func:`fit_task`
and ``infrec fit --params params.yaml`` — both call ``run``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from prefect import task

from models.infinite_ae import (FULL_DATA_LAMBDAS, SUMMARY_LAMBDAS, InfAE, LambdaGridError, evaluate,
                                fit_select, kernel_matrix)
from models.kernels import NTKConfig
from tasks import stop
from tasks.data import Dataset, load_dataset
from tasks.errors import InputError
from tasks.io import write_json
from tasks.model_store import save_model
from tasks.params import Params
from tasks.runtime import say, task_options


def choose_support(
    dataset: Dataset,
    *,
    support_path: str | Path | None = None,
    user_support: float | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, Any], bool]:
    """The support rows to fit on: all train users, a user sample, or a summary file.

    Returns ``(support, description, support_is_val_context)``.
    """
    if support_path is not None:
        from tasks.summary import read_summary

        support, item_ids, meta = read_summary(support_path)
        if len(item_ids) != dataset.n_items or not np.array_equal(item_ids, dataset.item_ids):
            raise InputError(
                f"{support_path}: its item map ({len(item_ids)} items) does not match the data "
                f"directory {dataset.path} ({dataset.n_items} items)"
            )
        return support, {"kind": "summary", "rows": int(support.shape[0]),
                         "sampler": meta.get("sampler"), "meta": meta}, False
    train = dataset.train
    if user_support is not None and user_support < 1.0 * dataset.n_users:
        n_keep = (int(round(user_support * dataset.n_users)) if user_support <= 1.0
                  else int(user_support))
        if n_keep < 1:
            raise InputError(f"user_support={user_support} keeps no user")
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(dataset.n_users, size=n_keep, replace=False))
        support = train[rows].toarray().astype(np.float32)
        return support, {"kind": "user_sample", "rows": n_keep, "seed": seed}, False
    return (train.toarray().astype(np.float32), {"kind": "all_users", "rows": dataset.n_users},
            True)


def fit_dataset(
    dataset: Dataset,
    *,
    lambdas: Sequence[float] | None = None,
    depth: int = 1,
    select_metric: str = "hr@100",
    support_path: str | Path | None = None,
    user_support: float | None = None,
    seed: int = 0,
    batch_size: int = 2048,
    max_users: int | None = None,
    sample_seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> tuple[InfAE, dict[str, Any]]:
    """Fit, select λ on validation ``select_metric``, evaluate on test: ``(model, report)``.

    ``max_users``/``sample_seed``: validation and test score a fixed seeded sample of that many
    users of each split when there are more (:meth:`tasks.data.Dataset.val_set`); the report's
    ``sample`` says how many were scored, of how many, and ``val_ci95``/``test_ci95`` give the
    half-widths of the 95% intervals. A λ that cannot be solved even stabilised is skipped
    (``status`` in the λ path); a grid where every λ fails is one :class:`InputError`-free
    ``RuntimeError`` naming the kernel and the grid.
    """
    say_ = log or (lambda _msg: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    support, support_info, is_ctx = choose_support(
        dataset, support_path=support_path, user_support=user_support, seed=seed
    )
    if lambdas is None:
        lambdas = FULL_DATA_LAMBDAS if support_info["kind"] != "summary" else SUMMARY_LAMBDAS
    config = NTKConfig(depth=depth)
    val = dataset.val_set(max_users, sample_seed)
    val_rows = None
    if is_ctx and val.rows is not None:  # the support is every user; validation a sample of them
        is_ctx, val_rows = False, val.rows
    timings["prepare"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    kernel = kernel_matrix(support, config)
    timings["kernel"] = time.perf_counter() - t1
    say_(f"kernel {kernel.shape[0]}×{kernel.shape[1]} in {timings['kernel']:.2f}s")

    t2 = time.perf_counter()

    def on_lambda(result) -> None:
        if result.skipped:
            say_(f"λ={result.lam:g} skipped: K + λ̃I not positive definite even stabilised "
                 f"({result.seconds:.1f}s)")
            stop.check()
            return
        note = f" (stabilised: λ̃={result.lam_scaled:.3g})" if result.stabilised else ""
        say_(f"λ={result.lam:g}{note}: val {select_metric}={result.val[select_metric]:.2f} "
             f"({result.seconds:.1f}s)")
        stop.check()  # SIGTERM/SIGINT: end between λs (tasks/stop.py)

    try:
        model, path = fit_select(
            support, val, lambdas, config, support_is_val_context=is_ctx, val_rows=val_rows,
            batch_size=batch_size, kernel=kernel, on_lambda=on_lambda, select_metric=select_metric,
        )
    except LambdaGridError as exc:
        raise RuntimeError(f"∞-AE on {support_info['kind']} ({support.shape[0]} rows): {exc}") from None
    del kernel
    timings["fit"] = time.perf_counter() - t2
    best = next(r for r in path if r.lam == model.lam)
    val_stats: dict[str, Any] = {}
    if val.rows is not None:  # the kept λ's interval, on the same sample
        val_ci = _val_interval(model, val, batch_size, val_rows)
        val_stats = {"users": val.n_users, "ci95": val_ci}

    t3 = time.perf_counter()
    test_set = dataset.test_set(max_users, sample_seed)
    test_stats: dict[str, Any] = {}
    test = evaluate(model, test_set, batch_size=batch_size, stats=test_stats)
    timings["evaluate"] = time.perf_counter() - t3
    say_(f"λ={model.lam:g} test {select_metric}={test[select_metric]:.2f} "
         f"± {test_stats['ci95'].get(select_metric, 0.0):.2f} (95%, {test_stats['users']} users"
         + (f" of {test_set.population}" if test_set.population else "") + ")")
    report = {
        "metrics": {"lambda": model.lam, "val": best.val, "test": test,
                    "test_ci95": test_stats["ci95"],
                    **({"val_ci95": val_stats["ci95"]} if val_stats else {}),
                    "sample": sample_description(val, test_set, max_users, sample_seed)},
        "lambda_path": [
            {"lambda": r.lam, "lambda_scaled": r.lam_scaled, "stabilised": r.stabilised,
             "status": r.status, **r.val}
            for r in path
        ],
        "support": support_info,
        "select_metric": select_metric,
        "seconds": timings,
    }
    return model, report


def sample_description(val: Any, test: Any, max_users: int | None, seed: int) -> dict[str, Any]:
    """How many users each split scored, of how many (equal when every user was scored)."""
    return {"max_users": max_users, "seed": seed,
            "val_users": val.n_users, "val_population": val.population or val.n_users,
            "test_users": test.n_users, "test_population": test.population or test.n_users}


def _val_interval(model: InfAE, val: Any, batch_size: int, val_rows: Any) -> dict[str, float]:
    """95% half-widths of the kept model's validation metrics on the sample ``val``."""
    from models.infinite_ae import evaluate_score_batches

    stats: dict[str, Any] = {}
    if val_rows is not None:  # validation users are support rows: K α = X − λ̃ α
        x, alpha = model.support, model.alpha
        batches = ((s, x[val_rows[s:s + batch_size]] - model.lam_scaled * alpha[val_rows[s:s + batch_size]])
                   for s in range(0, len(val_rows), batch_size))
        evaluate_score_batches(batches, val, stats=stats)
    else:
        evaluate(model, val, batch_size=batch_size, stats=stats)
    return stats["ci95"]


def run(params: Params, log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """The fit stage (see the module docstring)."""
    from tasks.plots import plot_lambda_path

    log = log or say()
    f, paths, metric = params.fit, params.paths(), params.selection.metric
    dataset = load_dataset(paths.processed)
    model, report = fit_dataset(dataset, lambdas=f.summary_lambdas, depth=f.depth,
                                select_metric=metric, support_path=paths.summary,
                                batch_size=f.batch_size, max_users=params.evaluate.max_users,
                                sample_seed=params.evaluate.sample_seed, log=log)
    save_model(model, paths.model, dataset.item_ids, report, dataset.data_version, overwrite=True)
    write_json(paths.metrics, report["metrics"])
    write_json(paths.lambda_path, report["lambda_path"])
    plot_lambda_path(report["lambda_path"], paths.plots / "lambda_path.png",
                     metrics=dict.fromkeys([metric, "hr@100"]))
    return {"model_dir": str(paths.model), "lambda": model.lam,
            "val": report["metrics"]["val"], "test": report["metrics"]["test"],
            "sample": report["metrics"]["sample"], "metrics": report["metrics"],
            "lambda_path": report["lambda_path"], "seconds": report["seconds"]}


@task(name="fit", **task_options())
def fit_task(params: Params) -> dict[str, Any]:
    return run(params)


__all__ = ["run", "fit_task", "fit_dataset", "choose_support"]
