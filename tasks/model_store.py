"""The fitted ∞-AE on disk — read by the fit stage, the registry and the served model.

A model directory holds:

* ``support.npy`` and ``alpha.npy`` — the support rows X (n × m) and α = (K + λ̃I)⁻¹X, float32;
* for the ``blend`` family (:class:`models.blend.Blend`: ∞-AE and EASE, z-scored and mixed),
  also ``ease_weights.npy`` — EASE's item × item B (and ``ease_items.npy`` when EASE models
  part of the catalogue);
* ``model.json`` — the family (``model``: ``infinite_ae`` or ``blend``), λ, λ̃, kernel config,
  support description, the blend's weight and EASE's λ, data version;
* ``item_map.parquet`` — the raw item id of each column;
* ``metrics.json`` / ``lambda_path.json`` — validation/test metrics and the λ path.

Every file is a pure function of the fit (no timestamps, no absolute paths), so a directory's
DVC hash is reproducible. Written atomically (:func:`tasks.io.atomic_dir`). This module imports
NumPy, Polars and the pure model only — never Prefect, MLflow or TensorFlow — because the
served model loads through it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from models.baselines import EASE
from models.blend import Blend
from models.infinite_ae import InfAE
from models.kernels import NTKConfig
from tasks.errors import InputError
from tasks.io import atomic_dir

MODEL_FORMAT = 2  # 1: arrays in model.npz (still readable)
REQUIRED = ("model.json", "item_map.parquet")
FAMILIES = ("infinite_ae", "blend")


def save_model(model: InfAE | Blend, out_dir: str | Path, item_ids: np.ndarray, report: dict[str, Any],
               data_version: str, overwrite: bool = False) -> Path:
    """Write a model directory atomically (see the module docstring)."""
    import polars as pl

    out_dir = Path(out_dir)
    blend = model if isinstance(model, Blend) else None
    infae = blend.a if blend is not None else model
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        np.save(tmp / "support.npy", np.ascontiguousarray(infae.support, dtype=np.float32))
        np.save(tmp / "alpha.npy", np.ascontiguousarray(infae.alpha, dtype=np.float32))
        if blend is not None:
            np.save(tmp / "ease_weights.npy", np.ascontiguousarray(blend.b.weights, dtype=np.float32))
            if blend.b.items is not None:
                np.save(tmp / "ease_items.npy", np.asarray(blend.b.items, dtype=np.int64))
        pl.DataFrame({"item": np.arange(len(item_ids), dtype=np.int32),
                      "raw_id": np.asarray(item_ids).astype(np.int64)}
                     ).write_parquet(tmp / "item_map.parquet")
        info = {
            "format_version": MODEL_FORMAT,
            "model": "blend" if blend is not None else "infinite_ae",
            "lambda": infae.lam,
            "lambda_scaled": infae.lam_scaled,
            "kernel": {"depth": infae.config.depth, "w_std": infae.config.w_std,
                       "b_std": infae.config.b_std},
            **({"blend": {"weight": blend.weight, "ease_lambda": blend.b.lam,
                          "normalise": "z-score per user"}} if blend is not None else {}),
            "n_support": int(infae.support.shape[0]),
            "n_items": int(infae.n_items),
            "support": {k: v for k, v in report["support"].items() if k not in ("meta", "path")},
            "select_metric": report.get("select_metric"),
            "data_version": data_version,
        }
        (tmp / "model.json").write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(report["metrics"], indent=2) + "\n")
        (tmp / "lambda_path.json").write_text(json.dumps(report["lambda_path"], indent=2) + "\n")
    return out_dir


def _arrays(model_dir: Path, version: int) -> tuple[np.ndarray, np.ndarray]:
    if version == 1:
        with np.load(model_dir / "model.npz") as arrays:
            return arrays["support"], arrays["alpha"]
    return np.load(model_dir / "support.npy"), np.load(model_dir / "alpha.npy")


def load_model(model_dir: str | Path) -> tuple[InfAE | Blend, np.ndarray, dict[str, Any]]:
    """Read a model directory: ``(model, item_ids, info)`` — an :class:`InfAE`, or a
    :class:`Blend` for the ``blend`` family. A missing, truncated or inconsistent
    file is an :class:`InputError` that names it (one line)."""
    import polars as pl

    model_dir = Path(model_dir)
    for name in REQUIRED:
        if not (model_dir / name).is_file():
            raise InputError(f"{model_dir / name}: missing (not an infrec model directory?)")
    try:
        info = json.loads((model_dir / "model.json").read_text())
        version = info.get("format_version")
        if version not in (1, MODEL_FORMAT):
            raise InputError(f"{model_dir / 'model.json'}: unknown format_version {version!r}")
        support, alpha = _arrays(model_dir, version)
        kcfg = info["kernel"]
        model = InfAE(
            support=support, alpha=alpha, lam=float(info["lambda"]),
            lam_scaled=float(info["lambda_scaled"]),
            config=NTKConfig(depth=int(kcfg["depth"]), w_std=float(kcfg["w_std"]),
                             b_std=float(kcfg["b_std"])),
        )
        items = pl.read_parquet(model_dir / "item_map.parquet").sort("item")["raw_id"].to_numpy()
        family = info.get("model", "infinite_ae")
        if family not in FAMILIES:
            raise InputError(f"{model_dir / 'model.json'}: unknown model family {family!r}")
        ease = None
        if family == "blend":
            weights = np.load(model_dir / "ease_weights.npy")
            ease_items = (np.load(model_dir / "ease_items.npy")
                          if (model_dir / "ease_items.npy").is_file() else None)
            ease = EASE(weights=weights, lam=float(info["blend"]["ease_lambda"]), items=ease_items,
                        n_items=len(items) if ease_items is not None else None)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt files: one line, no traceback
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{model_dir}: cannot load the model ({type(exc).__name__}: {first})"
                         ) from None
    if support.shape != alpha.shape or support.shape[1] != len(items) or not (
            np.isfinite(alpha).all()):
        raise InputError(f"{model_dir}: inconsistent model files (support {support.shape}, "
                         f"alpha {alpha.shape}, {len(items)} items)")
    if ease is not None:
        n_fitted = len(items) if ease.items is None else len(ease.items)
        if ease.weights.shape != (n_fitted, n_fitted) or not np.isfinite(ease.weights).all():
            raise InputError(f"{model_dir}: inconsistent model files (ease_weights "
                             f"{ease.weights.shape}, {len(items)} items)")
        try:
            return Blend(a=model, b=ease, weight=float(info["blend"]["weight"])), items, info
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{model_dir / 'model.json'}: bad blend ({exc})") from None
    return model, items, info


__all__ = ["save_model", "load_model", "MODEL_FORMAT"]
