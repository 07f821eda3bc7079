"""The pipeline's pictures, as PNG files that DVC (image plots), MLflow and a browser show offline.

* :func:`plot_curve` — the Distill-CF curve: loss and the validation selection metric by step;
* :func:`plot_lambda_path` — validation metrics versus λ (log x axis; λ = 0, when in the grid,
  is drawn at the left edge and labelled).

Same inputs → same bytes (no timestamps in the files), so committed plots stay unchanged when a
run reproduces the same numbers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

from tasks.io import atomic_file

_PNG_METADATA = {"Software": None}  # no library version in the file: bytes depend on data only


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out_png: str | Path) -> Path:
    out_png = Path(out_png)
    with atomic_file(out_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png", metadata=_PNG_METADATA)
    _pyplot().close(fig)
    return out_png


def plot_lambda_path(lambda_path: list[dict[str, Any]], out_png: str | Path,
                     metrics: Iterable[str]) -> Path:
    """Validation ``metrics`` versus λ on a log x axis."""
    plt = _pyplot()
    positive = [p["lambda"] for p in lambda_path if p["lambda"] > 0]
    zero_at = min(positive) / 10 if positive else 1e-6  # where λ = 0 is drawn
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for m in metrics:
        pts = [(p["lambda"] if p["lambda"] > 0 else zero_at, p.get(m, math.nan))
               for p in sorted(lambda_path, key=lambda r: r["lambda"])]
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"val {m}")
    ax.set_xscale("log")
    if any(p["lambda"] == 0 for p in lambda_path):
        ax.annotate("λ=0", (zero_at, 0), xycoords=("data", "axes fraction"), fontsize=7,
                    xytext=(0, 2), textcoords="offset points", ha="center")
    ax.set_xlabel("λ (log scale)")
    ax.set_ylabel("metric (×100)")
    ax.set_title("∞-AE: validation metrics versus λ")
    ax.legend()
    fig.tight_layout()
    return _save(fig, out_png)


def plot_curve(curve: list[dict[str, Any]], out_png: str | Path, metric: str,
               title: str = "Distill-CF") -> Path:
    """Loss (top) and validation ``metric`` (bottom) against the step."""
    plt = _pyplot()
    fields = ["loss", f"val_{metric}"]
    fig, axes = plt.subplots(2, 1, figsize=(5, 4.2), sharex=True)
    for ax, f in zip(axes, fields):
        pts = [(r["step"], r[f]) for r in curve if isinstance(r.get(f), (int, float))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="." if len(pts) < 60 else None)
        ax.set_ylabel(f.replace("val_", "val "), fontsize=8)
    axes[-1].set_xlabel("step")
    axes[0].set_title(title)
    fig.tight_layout()
    return _save(fig, out_png)


__all__ = ["plot_curve", "plot_lambda_path"]
