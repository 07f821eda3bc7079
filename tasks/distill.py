"""Distill a processed data directory into a small summary file (Distill-CF or a sampler baseline).

``distill_dataset(data_dir, out_path, sampler=..., budget=...)`` loads the data
(:func:`tasks.data.load_dataset`), builds the summary with :mod:`models.distill_cf` or
:mod:`models.samplers`, validates ∞-AE on it (λ grid, validation HR@100), writes it with
:func:`tasks.summary.write_summary` and, for Distill-CF, a JSON-lines log of every step
(``step, loss, seconds, lambda`` and, at evaluated steps, ``val_hr@100, val_ndcg@10``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tasks.errors import InputError

SAMPLERS = ("distill-cf", "random", "head")
_KERNEL_OPTIONS = ("depth", "w_std", "b_std")


def default_log_path(out_path: str | Path) -> Path:
    """``summary.parquet`` → ``summary.log.jsonl``."""
    return Path(out_path).with_suffix(".log.jsonl")


def make_config(budget: int = 500, seed: int = 0, steps: int = 500, samples: int = 200,
                tau: float = 10.0, **options: Any) -> Any:
    """A :class:`models.distill_cf.DistillConfig`; unknown or invalid options raise InputError."""
    from models.distill_cf import DistillConfig
    from models.kernels import NTKConfig

    known = {f.name for f in dataclasses.fields(DistillConfig)} - {"kernel"}
    kernel_options = {k: options.pop(k) for k in list(options) if k in _KERNEL_OPTIONS}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InputError(f"unknown distill option(s): {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(known | set(_KERNEL_OPTIONS)))})")
    for key in ("eval_steps", "lambdas"):
        if key in options and options[key] is not None:
            options[key] = tuple(options[key])
    try:
        return DistillConfig(budget=int(budget), seed=int(seed), max_steps=int(steps),
                             samples=int(samples), tau=float(tau),
                             kernel=NTKConfig(**kernel_options), **options)
    except (TypeError, ValueError) as exc:
        raise InputError(f"invalid distill configuration: {exc}") from exc


def _config_dict(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _stderr_progress(total: int) -> Callable[[dict[str, Any]], None]:
    """A one-line progress report on stderr, rewritten in place."""
    start = time.perf_counter()

    def report(info: dict[str, Any]) -> None:
        step = info["step"]
        hr = info.get("last_val_hr@100")
        loss = info.get("loss")
        elapsed = time.perf_counter() - start
        eta = elapsed / step * (total - step) if step else float("nan")
        sys.stderr.write(f"\rstep {step}/{total}  loss {loss if loss is None else f'{loss:.4f}'}  "
                         f"val HR@100 {hr if hr is None else f'{hr:.2f}'}  ETA {eta:5.0f}s ")
        sys.stderr.flush()

    return report


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
    progress: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    **config: Any,
) -> dict[str, Any]:
    """Write the summary of ``data_dir`` to ``out_path``; return a small report.

    ``sampler``: ``distill-cf`` (learned), ``random`` or ``head`` (most active users). Further
    keywords are :class:`models.distill_cf.DistillConfig` fields (``lr``, ``reg``, ``patience``,
    ``eval_every``, ``lambdas``, ``target_batch``, ``noise``) or kernel options (``depth``).
    ``on_step(info)`` is called after every step; ``progress`` prints a stderr line instead
    when no ``on_step`` is given. Bad inputs raise :class:`InputError`.
    """
    from models.infinite_ae import fit_select
    from models.samplers import head_user_indices, random_user_indices, rows_of
    from tasks.data import load_dataset
    from tasks.summary import write_summary

    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r} (one of {', '.join(SAMPLERS)})")
    cfg = make_config(budget=budget, seed=seed, steps=steps, samples=samples, tau=tau, **config)
    out_path = Path(out_path)
    dataset = load_dataset(data_dir)
    n_active = int((np.diff(dataset.train.indptr) > 0).sum())
    if cfg.budget > n_active:
        raise InputError(f"--budget {cfg.budget} exceeds the {n_active} users with train "
                         f"interactions in {dataset.path}")
    val = dataset.val_set()
    started = time.perf_counter()
    meta: dict[str, Any] = {
        "sampler": sampler, "budget": cfg.budget, "seed": cfg.seed,
        "source": {"data_dir": str(dataset.path), "data_version": dataset.data_version,
                   "n_users": dataset.n_users, "n_items": dataset.n_items},
    }
    report: dict[str, Any] = {"path": str(out_path), "sampler": sampler, "budget": cfg.budget,
                              "seed": cfg.seed}

    if sampler == "distill-cf":
        from models.distill_cf import distill

        log_path = Path(log_path) if log_path is not None else default_log_path(out_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        callback = on_step
        if callback is None and progress:
            callback = _stderr_progress(cfg.max_steps)
        with log_path.open("w") as log:

            def record(info: dict[str, Any]) -> None:
                row = {"step": info["step"], "loss": info["loss"],
                       "seconds": round(info["seconds"], 4), "lambda": info["lambda"],
                       "evaluated": info["evaluated"]}
                if info["evaluated"]:
                    row["val_hr@100"] = info["val"]["hr@100"]
                    row["val_ndcg@10"] = info["val"]["ndcg@10"]
                log.write(json.dumps(row) + "\n")
                log.flush()
                if callback is not None:
                    callback(info)

            result = distill(dataset.train, val, cfg, on_step=record)
        if callback is not None and on_step is None:
            sys.stderr.write("\n")
        support = result.summary
        meta.update({"config": _config_dict(cfg), "best_step": result.best_step,
                     "lambda": result.best_lambda, "val": result.best_val,
                     "init_val": result.init_val,
                     "init_users": result.init_users.tolist(), "steps_run": result.steps_run})
        report.update({"best_step": result.best_step, "lambda": result.best_lambda,
                       "val": result.best_val,
                       "init_val": result.init_val, "steps_run": result.steps_run,
                       "seconds_per_step": result.seconds_per_step, "log_path": str(log_path)})
    else:
        if sampler == "random":
            users = random_user_indices(dataset.train, cfg.budget, cfg.seed)
        else:
            users = head_user_indices(dataset.train, cfg.budget)
        support = rows_of(dataset.train, users)
        model, path = fit_select(support, val, cfg.lambdas, cfg.kernel,
                                 select_metric=cfg.select_metric)
        best_val = next(p.val for p in path if p.lam == model.lam)
        meta.update({"users": users.tolist(), "lambda": model.lam, "val": best_val,
                     "config": {"lambdas": list(cfg.lambdas),
                                "kernel": dataclasses.asdict(cfg.kernel)}})
        report.update({"best_step": 0, "lambda": model.lam, "val": best_val, "steps_run": 0,
                       "seconds_per_step": None})
        if log_path is not None:
            # one record, so that a pipeline's curve plot has the sampler's validation point
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            Path(log_path).write_text(json.dumps({"step": 0, "lambda": model.lam, "evaluated": True,
                                                  "val_hr@100": best_val["hr@100"],
                                                  "val_ndcg@10": best_val["ndcg@10"]}) + "\n")
            report["log_path"] = str(log_path)

    write_summary(out_path, support, dataset.item_ids, meta)
    if report.get("log_path"):
        report["curve_path"] = str(write_curve_csv(report["log_path"]))
    report["seconds"] = time.perf_counter() - started
    report["nnz"] = int((support > 1e-6).sum())
    return report


CURVE_COLUMNS = ("step", "loss", "val_hr@100", "val_ndcg@10")


def write_curve_csv(log_path: str | Path) -> Path:
    """The step log as CSV beside it (``.csv``): what `dvc plots` draws (it reads no JSON lines)."""
    log_path = Path(log_path)
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    out = log_path.with_suffix(".csv")
    lines = [",".join(CURVE_COLUMNS)]
    for row in rows:
        lines.append(",".join("" if row.get(c) is None else f"{row[c]}" for c in CURVE_COLUMNS))
    out.write_text("\n".join(lines) + "\n")
    return out


__all__ = ["distill_dataset", "write_curve_csv", "make_config", "default_log_path", "SAMPLERS"]
