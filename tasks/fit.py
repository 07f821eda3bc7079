"""Fit ∞-AE on an ingested data directory, pick λ on validation, evaluate on test, save.

A fitted model directory holds:

* ``model.npz``   — ``support`` (n × m float32) and ``alpha`` (n × m float32);
* ``model.json``  — λ, λ̃, kernel config, support description, data version, timings;
* ``item_map.parquet`` — raw item id of each column (copied from the data directory);
* ``lambda_path.json`` — validation metrics for every λ of the grid (metric versus λ);
* ``metrics.json`` — ``{"lambda": λ, "val": {metric: value}, "test": {metric: value}}``.

Everything is written to a temporary sibling directory and renamed at the end, so a failure
leaves no partial model behind.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from models.infinite_ae import FULL_DATA_LAMBDAS, SUMMARY_LAMBDAS, InfAE, evaluate, fit_select
from models.kernels import NTKConfig
from tasks.data import Dataset, load_dataset
from tasks.errors import InputError
from tasks.io import atomic_dir, write_json

MODEL_FORMAT = 1


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
        return support, {"kind": "summary", "path": str(support_path), "rows": int(support.shape[0]),
                         "meta": meta}, False
    train = dataset.train
    if user_support is not None and user_support < 1.0 * dataset.n_users:
        n_keep = int(round(user_support * dataset.n_users)) if user_support <= 1.0 else int(user_support)
        if n_keep < 1:
            raise InputError(f"user_support={user_support} keeps no user")
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(dataset.n_users, size=n_keep, replace=False))
        support = train[rows].toarray().astype(np.float32)
        return support, {"kind": "user_sample", "rows": n_keep, "seed": seed}, False
    return train.toarray().astype(np.float32), {"kind": "all_users", "rows": dataset.n_users}, True


def fit_dataset(
    dataset: Dataset,
    *,
    lambdas: Sequence[float] | None = None,
    depth: int = 1,
    support_path: str | Path | None = None,
    user_support: float | None = None,
    seed: int = 0,
    batch_size: int = 2048,
    log: Callable[[str], None] | None = None,
) -> tuple[InfAE, dict[str, Any]]:
    """Fit, select λ on validation HR@100, evaluate on test. Returns the model and a report."""
    say = log or (lambda _msg: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    support, support_info, is_ctx = choose_support(
        dataset, support_path=support_path, user_support=user_support, seed=seed
    )
    if lambdas is None:
        lambdas = FULL_DATA_LAMBDAS if support_info["kind"] != "summary" else SUMMARY_LAMBDAS
    config = NTKConfig(depth=depth)
    val = dataset.val_set()
    timings["prepare"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    from models.infinite_ae import kernel_matrix

    kernel = kernel_matrix(support, config)
    timings["kernel"] = time.perf_counter() - t1
    say(f"kernel {kernel.shape[0]}×{kernel.shape[1]} in {timings['kernel']:.2f}s")

    t2 = time.perf_counter()

    def on_lambda(result) -> None:
        note = " (stabilised)" if result.stabilised else ""
        say(f"λ={result.lam:g}{note}: val hr@100={result.val['hr@100']:.2f} ndcg@10={result.val['ndcg@10']:.2f}")

    model, path = fit_select(
        support, val, lambdas, config, support_is_val_context=is_ctx, batch_size=batch_size,
        kernel=kernel, on_lambda=on_lambda,
    )
    del kernel
    timings["fit"] = time.perf_counter() - t2
    best = next(r for r in path if r.lam == model.lam)

    t3 = time.perf_counter()
    test = evaluate(model, dataset.test_set(), batch_size=batch_size)
    timings["evaluate"] = time.perf_counter() - t3
    say(f"λ={model.lam:g} test ndcg@10={test['ndcg@10']:.2f} hr@10={test['hr@10']:.2f}")
    report = {
        "metrics": {"lambda": model.lam, "val": best.val, "test": test},
        "lambda_path": [
            {"lambda": r.lam, "lambda_scaled": r.lam_scaled, "stabilised": r.stabilised, **r.val}
            for r in path
        ],
        "support": support_info,
        "seconds": timings,
    }
    return model, report


def save_model(model: InfAE, out_dir: str | Path, item_ids: np.ndarray, report: dict[str, Any],
               data_version: str, overwrite: bool = False) -> Path:
    """Write a model directory atomically (see module docstring)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        np.savez(tmp / "model.npz", support=model.support, alpha=model.alpha)
        import polars as pl

        pl.DataFrame({"item": np.arange(len(item_ids), dtype=np.int32), "raw_id": item_ids.astype(np.int64)}).write_parquet(tmp / "item_map.parquet")
        info = {
            "format_version": MODEL_FORMAT,
            "model": "infinite_ae",
            "lambda": model.lam,
            "lambda_scaled": model.lam_scaled,
            "kernel": {"depth": model.config.depth, "w_std": model.config.w_std, "b_std": model.config.b_std},
            "n_support": int(model.support.shape[0]),
            "n_items": int(model.n_items),
            "support": {k: v for k, v in report["support"].items() if k != "meta"},
            "data_version": data_version,
            "seconds": report["seconds"],
        }
        write_json(tmp / "model.json", info)
        write_json(tmp / "lambda_path.json", report["lambda_path"])
        write_json(tmp / "metrics.json", report["metrics"])
    return out_dir


def load_model(model_dir: str | Path) -> tuple[InfAE, np.ndarray, dict[str, Any]]:
    """Read a model directory written by :func:`save_model`: ``(model, item_ids, info)``."""
    model_dir = Path(model_dir)
    for name in ("model.npz", "model.json", "item_map.parquet"):
        if not (model_dir / name).is_file():
            raise InputError(f"{model_dir / name}: missing (not an `infrec fit` model directory?)")
    import polars as pl

    info = json.loads((model_dir / "model.json").read_text())
    if info.get("format_version") != MODEL_FORMAT:
        raise InputError(f"{model_dir / 'model.json'}: unknown format_version {info.get('format_version')!r}")
    arrays = np.load(model_dir / "model.npz")
    kcfg = info["kernel"]
    model = InfAE(
        support=arrays["support"], alpha=arrays["alpha"], lam=float(info["lambda"]),
        lam_scaled=float(info["lambda_scaled"]),
        config=NTKConfig(depth=int(kcfg["depth"]), w_std=float(kcfg["w_std"]), b_std=float(kcfg["b_std"])),
    )
    items = pl.read_parquet(model_dir / "item_map.parquet").sort("item")["raw_id"].to_numpy()
    return model, items, info


def fit(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    metrics_path: str | Path | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """CLI/pipeline entry: load, fit, save the model (and ``metrics.json``); returns the report."""
    dataset = load_dataset(data_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise InputError(f"{out_dir}: already exists (use --overwrite to replace it)")
    model, report = fit_dataset(dataset, log=log, **kwargs)
    save_model(model, out_dir, dataset.item_ids, report, dataset.data_version, overwrite=overwrite)
    if metrics_path is not None:
        write_json(Path(metrics_path), report["metrics"], atomic=True)
    return report


__all__ = ["fit", "fit_dataset", "save_model", "load_model", "choose_support"]

