"""``infrec distill``: a processed data directory → a small data summary file (Typer command).

Registered by :mod:`infrec.cli` through :func:`register`. Only Typer and the standard library
are imported at module level; JAX and the models load when the command runs.
"""

from __future__ import annotations

import contextlib
import enum
import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from infrec.stage_params import params_option


class Sampler(str, enum.Enum):
    distill_cf = "distill-cf"
    random = "random"
    head = "head"


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def distill(
    data: Path = typer.Option(
        ..., "--data", help="Processed data directory (the output of `infrec ingest`)."),
    out: Path = typer.Option(
        ..., "--out", help="Summary file to write (Parquet; replaced atomically)."),
    budget: int = typer.Option(500, "--budget", min=1, help="Synthetic users in the summary (μ)."),
    sampler: Sampler = typer.Option(
        Sampler.distill_cf, "--sampler",
        help="distill-cf learns the summary; random / head take random / most active real users."),
    seed: int = typer.Option(
        0, "--seed", help="Seed of the initial users, the noise and the random sampler."),
    steps: int = typer.Option(
        500, "--steps", min=0, help="Maximum Distill-CF steps (early stopping may end sooner)."),
    samples: int = typer.Option(
        200, "--samples", min=1, help="Gumbel draws per synthetic user (S)."),
    tau: float = typer.Option(10.0, "--tau", help="Gumbel-softmax temperature (τ > 0)."),
    log: Optional[Path] = typer.Option(
        None, "--log",
        help="JSON-lines log of every step (default: --out with suffix .log.jsonl)."),
    quiet: bool = typer.Option(
        False, "--quiet", help="No progress bar; only the final JSON report."),
    params: Optional[Path] = params_option(),
) -> None:
    """Distill --data into --budget synthetic users (Distill-CF) or sample a baseline summary."""
    from infrec.cli import _run_guarded

    stack = contextlib.ExitStack()
    progress: dict[str, Any] = {"bar": None, "done": 0}

    def describe(item: dict[str, Any] | None) -> str | None:
        if item is None:
            return None
        return (f"loss {_fmt(item.get('loss'), '.3f')}  "
                f"val HR@100 {_fmt(item.get('last_val_hr@100'), '.2f')}")

    def on_step(info: dict[str, Any]) -> None:
        if quiet:
            return
        if progress["bar"] is None:  # opened once the data has loaded and been validated
            progress["bar"] = stack.enter_context(typer.progressbar(
                length=max(steps, 1), label="distill", file=sys.stderr, show_eta=True,
                show_percent=False, show_pos=True, item_show_func=describe))
        if info["step"] > progress["done"]:
            progress["bar"].current_item = info  # shown by item_show_func
            progress["bar"].update(info["step"] - progress["done"])
            progress["done"] = info["step"]

    def run() -> dict[str, Any]:
        from tasks.distill import distill_dataset

        with stack:
            return distill_dataset(data, out, sampler=sampler.value, budget=budget, seed=seed,
                                   steps=steps, samples=samples, tau=tau, log_path=log,
                                   progress=False, on_step=on_step)

    report = _run_guarded(run)
    typer.echo(json.dumps(report, default=str))


def register(app: typer.Typer) -> None:
    """Add ``infrec distill`` to the CLI (called by :mod:`infrec.cli`)."""
    app.command("distill")(distill)


__all__ = ["distill", "register"]
