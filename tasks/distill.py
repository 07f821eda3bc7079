"""Distill stage: processed data → a small data summary (Distill-CF, or a sampler baseline).

``run(params)`` reads ``<state_dir>/data/processed`` and writes

* ``<state_dir>/data/summary.parquet`` — the summary (:mod:`tasks.summary` format);
* ``<state_dir>/data/distill_log.jsonl`` — every step, with timings (not versioned);
* ``<reports_dir>/distill_curve.csv`` — step, loss and the evaluated validation metrics (the
  ``dvc plots`` data; deterministic, no timings);
* ``<reports_dir>/distill.json`` — the summary's best step, λ and validation metrics beside the
  same ∞-AE fitted on ``budget`` random real users (same seed, same selection metric) and on the
  initial users Distill-CF started from: a summary is never reported without its baseline.

The budget is capped at the number of users with train interactions (logged, and reported as
``budget`` beside ``budget_requested``). Entry points: :func:`distill_task` and
``infrec distill --params params.yaml`` — both call ``run``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from prefect import task

from tasks import stop
from tasks.errors import InputError
from tasks.io import content_hash, write_json, write_text
from tasks.params import Params
from tasks.runtime import fault_point, say, task_options

SAMPLERS = ("distill-cf", "random", "head")
CURVE_COLUMNS = ("step", "loss", "lambda")


def make_config(budget: int = 500, seed: int = 0, steps: int = 500, samples: int = 200,
                tau: float = 10.0, **options: Any) -> Any:
    """A :class:`models.distill_cf.DistillConfig`; unknown or invalid options raise InputError.

    ``options``: further DistillConfig fields (``lr``, ``reg``, ``patience``, ``eval_every``,
    ``lambdas``, ``select_metric``, ``target_batch``, ``noise``) or ``depth`` (the NTK's).
    """
    from models.distill_cf import DistillConfig
    from models.kernels import NTKConfig

    known = {f.name for f in dataclasses.fields(DistillConfig)} - {"kernel"}
    depth = options.pop("depth", 1)
    unknown = sorted(set(options) - known)
    if unknown:
        raise InputError(f"unknown distill option(s): {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(known | {'depth'}))})")
    for key in ("eval_steps", "lambdas"):
        if options.get(key) is not None:
            options[key] = tuple(options[key])
    try:
        return DistillConfig(budget=int(budget), seed=int(seed), max_steps=int(steps),
                             samples=int(samples), tau=float(tau),
                             kernel=NTKConfig(depth=int(depth)), **options)
    except (TypeError, ValueError) as exc:
        raise InputError(f"invalid distill configuration: {exc}") from exc


def _config_dict(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def distill_dataset(
    data_dir: str | Path,
    out_path: str | Path,
    *,
    sampler: str = "distill-cf",
    budget: int = 500,
    seed: int = 0,
    steps: int = 500,
    samples: int = 200,
    tau: float = 10.0,
    log_path: str | Path | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    dataset: Any = None,
    eval_max_users: int | None = None,
    sample_seed: int = 0,
    **config: Any,
) -> dict[str, Any]:
    """Write the summary of ``data_dir`` to ``out_path``; return a small report.

    ``sampler``: ``distill-cf`` (learned), ``random`` or ``head`` (most active users). Further
    keywords: see :func:`make_config`. ``on_step(info)`` is called after every Distill-CF step;
    ``log_path`` receives one JSON line per step. A budget above the number of users with train
    interactions is capped (``report["budget"]`` is the budget used). Bad inputs raise
    :class:`InputError`. ``eval_max_users``/``sample_seed``: the in-loop checks score a fixed
    seeded sample of that many validation users when there are more (every user otherwise).
    At step 1 ``info["estimate_seconds"]`` forecasts the whole run (every step and check).
    """
    from models.infinite_ae import fit_select
    from models.samplers import head_user_indices, random_user_indices, rows_of
    from tasks.data import load_dataset
    from tasks.summary import write_summary

    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r} (one of {', '.join(SAMPLERS)})")
    dataset = dataset if dataset is not None else load_dataset(data_dir)
    n_active = int((np.diff(dataset.train.indptr) > 0).sum())
    if n_active < 1:
        raise InputError(f"{dataset.path}: no user has train interactions")
    requested = int(budget)
    cfg = make_config(budget=min(requested, n_active), seed=seed, steps=steps, samples=samples,
                      tau=tau, **config)
    out_path = Path(out_path)
    val = dataset.val_set(eval_max_users, sample_seed)
    started = time.perf_counter()
    meta: dict[str, Any] = {
        "sampler": sampler, "budget": cfg.budget, "budget_requested": requested, "seed": cfg.seed,
        "source": {"data_version": dataset.data_version, "n_users": dataset.n_users,
                   "n_items": dataset.n_items},
    }
    report: dict[str, Any] = {"sampler": sampler, "budget": cfg.budget,
                              "budget_requested": requested, "seed": cfg.seed,
                              "select_metric": cfg.select_metric,
                              "eval_users": val.n_users,
                              "eval_population": val.population or val.n_users}
    n_checks = 1 + sum(1 for s in range(1, cfg.max_steps + 1)
                       if cfg.is_eval_step(s) or s == cfg.max_steps)
    first_check: list[float] = []

    if sampler == "distill-cf":
        from models.distill_cf import distill

        log_file = None
        if log_path is not None:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            log_file = Path(log_path).open("w")
        try:
            def record(info: dict[str, Any]) -> None:
                if info["step"] == 0:
                    first_check.append(float(info.get("eval_seconds") or 0.0))
                elif info["step"] == 1 and first_check:  # the first step (compilation included)
                    info["estimate_seconds"] = (first_check[0] * n_checks
                                                + info["seconds"] * cfg.max_steps)
                if log_file is not None:
                    row = {"step": info["step"], "loss": info["loss"],
                           "seconds": round(info["seconds"], 4), "lambda": info["lambda"],
                           "evaluated": info["evaluated"]}
                    if info["evaluated"]:
                        row.update({f"val_{k}": v for k, v in info["val"].items()})
                    log_file.write(json.dumps(row) + "\n")
                    log_file.flush()
                if on_step is not None:
                    on_step(info)
                stop.check()  # SIGTERM/SIGINT: end between steps (tasks/stop.py)

            result = distill(dataset.train, val, cfg, on_step=record)
        finally:
            if log_file is not None:
                log_file.close()
        support = result.summary
        curve = [{"step": h["step"], "loss": h["loss"], "lambda": h["lambda"],
                  **({f"val_{k}": v for k, v in h["val"].items()} if h.get("evaluated") else {})}
                 for h in result.history]
        meta.update({"config": _config_dict(cfg), "best_step": result.best_step,
                     "lambda": result.best_lambda, "val": result.best_val,
                     "init_val": result.init_val, "init_users": result.init_users.tolist(),
                     "steps_run": result.steps_run})
        report.update({"best_step": result.best_step, "lambda": result.best_lambda,
                       "val": result.best_val, "init_val": result.init_val,
                       "steps_run": result.steps_run,
                       "seconds_per_step": result.seconds_per_step})
    else:
        if sampler == "random":
            users = random_user_indices(dataset.train, cfg.budget, cfg.seed)
        else:
            users = head_user_indices(dataset.train, cfg.budget)
        support = rows_of(dataset.train, users)
        model, path = fit_select(support, val, cfg.lambdas, cfg.kernel,
                                 select_metric=cfg.select_metric)
        best_val = next(p.val for p in path if p.lam == model.lam)
        curve = [{"step": 0, "loss": None, "lambda": model.lam,
                  **{f"val_{k}": v for k, v in best_val.items()}}]
        meta.update({"users": users.tolist(), "lambda": model.lam, "val": best_val,
                     "config": {"lambdas": list(cfg.lambdas), "select_metric": cfg.select_metric,
                                "kernel": dataclasses.asdict(cfg.kernel)}})
        report.update({"best_step": 0, "lambda": model.lam, "val": best_val, "steps_run": 0,
                       "seconds_per_step": None})
        if log_path is not None:
            write_text(log_path, json.dumps({**curve[0], "evaluated": True}) + "\n")

    write_summary(out_path, support, dataset.item_ids, meta)
    report["coverage"] = coverage(support, dataset.train)
    report["curve"] = curve
    report["seconds"] = time.perf_counter() - started
    report["nnz"] = int((support > 1e-6).sum())
    return report


def coverage(support: np.ndarray, train: Any) -> dict[str, float]:
    """How much of the catalogue a summary (or user sample) touches: the share of items with a
    non-zero entry (> 1e-6, as ``nnz``) and the share of train interactions on those items."""
    touched = np.asarray((np.asarray(support) > 1e-6).any(axis=0)).ravel()
    counts = np.asarray(train.sum(axis=0)).ravel()
    total = float(counts.sum())
    return {"items": float(touched.mean()) if touched.size else 0.0,
            "interactions": float(counts[touched].sum() / total) if total else 0.0}


def random_users_fit(dataset: Any, budget: int, seed: int, lambdas: tuple[float, ...],
                     depth: int, select_metric: str, batch_size: int = 2048,
                     max_users: int | None = None, sample_seed: int = 0) -> dict[str, Any]:
    """∞-AE on ``budget`` random real users (the seed Distill-CF starts from), λ by the same
    metric: the baseline every summary is reported beside. ``{lambda, val, test, test_ci95,
    coverage}``, scored on the evaluation sample (``max_users``, ``sample_seed``)."""
    from models.infinite_ae import evaluate, fit_select
    from models.kernels import NTKConfig
    from models.samplers import random_user_indices, rows_of

    users = random_user_indices(dataset.train, budget, seed)
    support = rows_of(dataset.train, users)
    model, path = fit_select(support, dataset.val_set(max_users, sample_seed), lambdas,
                             NTKConfig(depth=depth), select_metric=select_metric,
                             batch_size=batch_size)
    val = next(p.val for p in path if p.lam == model.lam)
    stats: dict[str, Any] = {}
    test = evaluate(model, dataset.test_set(max_users, sample_seed), batch_size=batch_size,
                    stats=stats)
    return {"lambda": model.lam, "val": val, "test": test, "test_ci95": stats["ci95"],
            "coverage": coverage(support, dataset.train)}


def write_curve_csv(curve: list[dict[str, Any]], out: Path, metric_columns: list[str]) -> Path:
    """The evaluated steps as CSV — what ``dvc plots`` draws (it reads no JSON lines)."""
    columns = [*CURVE_COLUMNS, *metric_columns]
    lines = [",".join(columns)]
    for row in curve:
        lines.append(",".join("" if row.get(c) is None else _num(row[c]) for c in columns))
    return write_text(out, "\n".join(lines) + "\n")


def _num(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def run(params: Params, log: Optional[Callable[[str], None]] = None,
        on_step: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
    """The distill stage (see the module docstring). ``on_step``: a progress callback (the CLI's
    bar); by default the evaluated steps are logged."""
    from tasks.data import load_dataset
    from tasks.plots import plot_curve

    log = log or say()
    d, paths, metric = params.distill, params.paths(), params.selection.metric
    if on_step is None:
        def on_step(info: dict[str, Any]) -> None:  # evaluated steps only: the log stays short
            if info.get("evaluated"):
                log(f"step {info['step']}: loss {info.get('loss')}, val {metric} "
                    f"{info['val'][metric]:.2f} (λ {info['lambda']:g}; check "
                    f"{info.get('eval_seconds', 0.0):.1f}s)")
            if "estimate_seconds" in info:
                log(f"distill: at most {d.steps} steps ({info['seconds']:.2f}s for the first) and "
                    f"their checks: ≈ {info['estimate_seconds'] / 60:.1f} min at most (early "
                    f"stopping may end sooner)")

    dataset = load_dataset(paths.processed)
    report = distill_dataset(
        paths.processed, paths.summary, sampler=d.sampler, budget=d.budget, seed=d.seed,
        steps=d.steps, samples=d.samples, tau=d.tau, log_path=paths.distill_log,
        on_step=on_step, dataset=dataset, lr=d.lr, reg=d.reg, patience=d.patience,
        min_steps=d.min_steps, eval_every=d.eval_every, target_batch=d.target_batch,
        lambdas=tuple(params.fit.summary_lambdas), select_metric=metric, depth=params.fit.depth,
        eval_max_users=d.eval_max_users, sample_seed=params.evaluate.sample_seed)
    if report["eval_users"] < report["eval_population"]:
        log(f"distill: in-loop checks scored {report['eval_users']} of "
            f"{report['eval_population']} validation users (distill.eval_max_users)")
    if report["budget"] < report["budget_requested"]:
        log(f"distill.budget {report['budget_requested']} capped at {report['budget']}: the "
            f"number of users with train interactions")
    fault_point("distill")  # the summary written, its reports not yet
    random = random_users_fit(dataset, report["budget"], d.seed, params.fit.summary_lambdas,
                              params.fit.depth, metric, params.fit.batch_size,
                              max_users=params.evaluate.max_users,
                              sample_seed=params.evaluate.sample_seed)
    summary_hash = content_hash(paths.summary)
    distill_report = {
        "sampler": d.sampler, "budget": report["budget"],
        "budget_requested": report["budget_requested"], "select_metric": metric,
        "best_step": report["best_step"], "steps_run": report["steps_run"],
        "lambda": report["lambda"], "val": report["val"],
        "init_val": report.get("init_val"), "random_users": random,
        "coverage": report["coverage"],
        "eval_users": report["eval_users"], "eval_population": report["eval_population"],
        "summary_hash": summary_hash,
    }
    write_json(paths.distill_report, distill_report)
    write_curve_csv(report["curve"], paths.distill_curve,
                    list(dict.fromkeys(["val_ndcg@10", "val_hr@100", f"val_{metric}"])))
    plot_curve(report["curve"], paths.plots / "distill_curve.png", metric,
               title=f"Distill-CF ({d.sampler}, budget {report['budget']})")
    log(f"summary ({d.sampler}, budget {report['budget']}, best step {report['best_step']}): "
        f"val {metric} {report['val'][metric]:.2f} vs {random['val'][metric]:.2f} for "
        f"{report['budget']} random users → {paths.summary} ({summary_hash}, "
        f"{report['seconds']:.1f}s); it touches {100 * report['coverage']['items']:.1f}% of the "
        f"items ({100 * report['coverage']['interactions']:.1f}% of train interactions)")
    return {"summary_path": str(paths.summary), "summary_hash": summary_hash,
            "seconds": report["seconds"], "report": distill_report,
            "seconds_per_step": report["seconds_per_step"]}


@task(name="distill", **task_options())
def distill_task(params: Params) -> dict[str, Any]:
    return run(params)


__all__ = ["run", "distill_task", "distill_dataset", "make_config", "random_users_fit",
           "write_curve_csv", "SAMPLERS"]
