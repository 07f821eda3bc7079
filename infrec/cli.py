"""The ``infrec`` command line (Typer). Heavy imports happen inside commands, never at start-up."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from infrec.stage_params import params_option

app = typer.Typer(
    help="infrec: ∞-AE and Distill-CF recommendation as a Prefect / MLflow / DVC pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit code 2, no traceback."""


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _run_guarded(fn, *args, **kwargs):
    """Call ``fn``; turn the project's input errors into a one-line message and exit code 2."""
    from tasks.errors import InputError

    try:
        return fn(*args, **kwargs)
    except (InputError, UserError) as exc:
        _fail(str(exc))


@app.command()
def generate(
    out: Path = typer.Option(..., "--out", help="CSV file to write (user_id,item_id,timestamp)."),
    users: int = typer.Option(3000, help="Number of users to generate."),
    items: int = typer.Option(1000, help="Number of items to generate."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives a byte-identical file."),
    params: Optional[Path] = params_option(),
) -> None:
    """Write the embedded synthetic implicit-feedback data set (power-law items, low-rank tastes)."""
    from tasks.synthetic import write_synthetic

    stats = _run_guarded(write_synthetic, out, n_users=users, n_items=items, seed=seed)
    typer.echo(json.dumps(stats))


@app.command()
def ingest(
    input: Path = typer.Option(..., "--input", "-i", help="Interactions file: ratings.dat, CSV/TSV or Parquet."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (must not exist unless --overwrite)."),
    fmt: Optional[str] = typer.Option(
        None, "--format", help="Force the input format: movielens, csv, tsv or parquet (default: detect)."
    ),
    seed: int = typer.Option(0, help="Seed of the paper's random split (ignored if the file has a split column)."),
    min_rating: Optional[float] = typer.Option(
        None, help="Keep only interactions with rating >= this value (default: keep all)."
    ),
    user_col: Optional[str] = typer.Option(None, help="Name of the user id column (default: user_id or an alias)."),
    item_col: Optional[str] = typer.Option(None, help="Name of the item id column (default: item_id or an alias)."),
    rating_col: Optional[str] = typer.Option(None, help="Name of the rating column (default: rating or an alias)."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    params: Optional[Path] = params_option(),
) -> None:
    """Validate, deduplicate, binarise, filter (<3 interactions) and split interactions."""
    from tasks.ingest import ingest as run_ingest

    columns = {k: v for k, v in (("user", user_col), ("item", item_col), ("rating", rating_col)) if v}
    manifest = _run_guarded(
        run_ingest,
        input,
        out,
        fmt=fmt,
        seed=seed,
        min_rating=min_rating,
        columns=columns or None,
        overwrite=overwrite,
    )
    typer.echo(json.dumps(manifest["counts"]))


def _parse_floats(text: Optional[str], option: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        _fail(f"{option}: expected comma-separated numbers, got {text!r}")
    if not values or any(v < 0 for v in values):
        _fail(f"{option}: expected non-negative numbers, got {text!r}")
    return values


def _log(quiet: bool):
    return (lambda _m: None) if quiet else (lambda m: typer.echo(m, err=True))


@app.command()
def fit(
    data: Path = typer.Option(..., "--data", "-d", help="Ingested data directory (from `infrec ingest`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Model directory to write."),
    metrics: Optional[Path] = typer.Option(
        None, "--metrics", help="Also write metrics.json here (it is always written inside --out)."
    ),
    lambdas: Optional[str] = typer.Option(
        None, help="Comma-separated λ grid (default 0,1,5,20,50,100; for a summary 1e-5,1e-3,0.1,1,5,50)."
    ),
    depth: int = typer.Option(1, min=1, max=8, help="Number of ReLU layers of the infinitely wide network."),
    support: Optional[Path] = typer.Option(
        None, "--support", help="Fit on a data summary file (from `infrec distill`) instead of all users."
    ),
    user_support: Optional[float] = typer.Option(
        None, help="Fit on a random sample of users: a fraction (≤1) or a count (>1)."
    ),
    seed: int = typer.Option(0, help="Seed of the user sample (with --user-support)."),
    batch_size: int = typer.Option(2048, min=1, help="Users scored per batch (bounds memory)."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines on stderr."),
    params: Optional[Path] = params_option(),
) -> None:
    """Fit ∞-AE (λ chosen on validation HR@100), evaluate on test, write the model and metrics."""
    from tasks.fit import fit as run_fit

    report = _run_guarded(
        run_fit, data, out, metrics_path=metrics, overwrite=overwrite, log=_log(quiet),
        lambdas=_parse_floats(lambdas, "--lambdas"), depth=depth, support_path=support,
        user_support=user_support, seed=seed, batch_size=batch_size,
    )
    typer.echo(json.dumps(report["metrics"]))


@app.command()
def evaluate(
    data: Path = typer.Option(..., "--data", "-d", help="Ingested data directory."),
    model: Path = typer.Option(..., "--model", "-m", help="Fitted model directory (from `infrec fit`)."),
    out: Path = typer.Option(..., "--out", "-o", help="evaluation.json to write (DVC metrics)."),
    max_reference_users: int = typer.Option(
        20000, min=10, help="Fidelity reference: ∞-AE on all users, or on a sample this large."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines on stderr."),
    params: Optional[Path] = params_option(),
) -> None:
    """Evaluate a fitted model against PopRec, a tuned EASE and ∞-AE on all users (the gate inputs)."""
    from tasks.evaluate import evaluation_report

    report = _run_guarded(evaluation_report, data, model, out, max_reference_users=max_reference_users,
                          log=_log(quiet))
    typer.echo(json.dumps(report["summary"]))


# Commands that live in their own modules; each module defines ``register(app)`` and keeps
# heavy imports inside its commands.
COMMAND_MODULES = ("infrec.cmd_distill", "infrec.cmd_pipeline", "infrec.cmd_versions",
                   "infrec.cmd_schedule", "infrec.cmd_scale")


def _register_optional_commands() -> None:
    import importlib

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(app)


_register_optional_commands()


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
