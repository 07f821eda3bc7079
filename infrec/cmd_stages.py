"""The stage commands: ``infrec <stage> --params params.yaml`` — what dvc.yaml runs.

Each is a thin call of its stage's ``run(params)`` (``tasks/<stage>.py``), the same function the
pipeline's Prefect task calls: the params file is validated whole before anything runs, and the
stage reads and writes the paths dvc.yaml names (under ``state_dir`` and ``reports_dir``).
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

import typer

from infrec.common import fail, guarded, load, locked, params_option, say_err, stoppable

QUIET_HELP = "No progress lines on stderr."


def _done(result: Any) -> None:
    typer.echo(json.dumps(result, default=str))


def generate(params: Optional[Path] = params_option(),
             quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP)) -> None:
    """Write the embedded default data set (generate.*) to <state_dir>/data/raw/."""
    from tasks.generate import run

    with stoppable("infrec generate", defer="generate"):
        _done(guarded(run, load(params), log=say_err(quiet)))


def ingest(params: Optional[Path] = params_option(),
           quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP)) -> None:
    """Snapshot ingest.input (or the embedded default) and ingest it: validate, de-duplicate,
    binarise, split, re-index → <state_dir>/data/processed."""
    from tasks.ingest import run

    with stoppable("infrec ingest", defer="ingest"):
        result = guarded(run, load(params), log=say_err(quiet))
    _done({"counts": result["counts"], "data_version": result["data_version"]})


def distill(params: Optional[Path] = params_option(),
            quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP)) -> None:
    """Distill the processed data into distill.budget synthetic users (Distill-CF), or sample a
    baseline summary; report it beside the same budget of random users."""
    from tasks.distill import run

    p = load(params)
    stack = ExitStack()
    bar: dict[str, Any] = {"bar": None, "done": 0}

    def on_step(info: dict[str, Any]) -> None:
        if quiet:
            return
        if bar["bar"] is None:  # opened once the data has loaded and been validated
            bar["bar"] = stack.enter_context(typer.progressbar(
                length=max(p.distill.steps, 1), label="distill", file=sys.stderr,
                show_eta=True, show_percent=False, show_pos=True,
                item_show_func=lambda i: None if i is None else
                f"loss {i.get('loss') or 0:.3f}  best val {p.selection.metric} "
                f"{(i.get(f'best_val_{p.selection.metric}') or 0):.2f}"))
        if info["step"] > bar["done"]:
            bar["bar"].current_item = info
            bar["bar"].update(info["step"] - bar["done"])
            bar["done"] = info["step"]

    with stoppable("infrec distill", defer="distill"), stack:
        result = guarded(run, p, log=say_err(quiet), on_step=on_step)
    _done(result["report"])


def fit(params: Optional[Path] = params_option(),
        quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP)) -> None:
    """Fit the candidate: NTK and λ chosen on the summary, ∞-AE on all users or the summary
    (fit.on), the families of fit.families compared on validation selection.metric; write
    <state_dir>/model and reports/metrics.json."""
    from tasks.fit import run

    with stoppable("infrec fit", defer="fit"):
        result = guarded(run, load(params), log=say_err(quiet))
    _done(result["metrics"])


def evaluate(params: Optional[Path] = params_option(),
             quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP)) -> None:
    """Evaluate the candidate against PopRec, a tuned EASE, ∞-AE on all users and random users
    (the gate inputs) → reports/evaluation.json."""
    from tasks.evaluate import run

    with stoppable("infrec evaluate", defer="evaluate"):
        _done(guarded(run, load(params), log=say_err(quiet))["summary"])


def version(params: Optional[Path] = params_option(),
            quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP)) -> None:
    """Record the workspace's outputs as a data version: dvc commit + push, tag data/vN."""
    from tasks.version import run

    p = load(params)
    if not p.versioning.enabled:
        fail("versioning.enabled is false in the params: nothing to version")
    with stoppable("infrec version", defer="version"), locked(p):
        _done(guarded(run, p, log=say_err(quiet)))


def register_cmd(params: Optional[Path] = params_option(),
                 quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP)) -> None:
    """Log the workspace's candidate (after `dvc repro`) to MLflow and register it as a model
    version (then: infrec promote VERSION)."""
    from tasks.register import run
    from tasks.version import check

    p = load(params)
    guarded(check, p)
    with stoppable("infrec register", defer="register"), locked(p):
        lineage: dict[str, Any] = {}
        if p.versioning.enabled:
            from tasks.dvc import find_version, lock_outputs, read_lock
            from tasks.version import workspace

            root = guarded(workspace, p)
            rel = os.path.relpath(p.state_path(), root)
            try:
                found = find_version(root, lock_outputs(read_lock(root),
                                                        [f"{rel}/data/{n}" for n in
                                                         ("input", "processed",
                                                          "summary.parquet")]))
            except Exception:  # noqa: BLE001 - no dvc.lock yet: unversioned
                found = None
            if found is not None:
                lineage["version"] = {"version": found.id, "hashes": found.hashes()}
        result = guarded(run, p, lineage, log=say_err(quiet))
    _done({k: result[k] for k in ("model_name", "version", "run_id", "unchanged")})


def register(app: typer.Typer) -> None:
    for fn in (generate, ingest, distill, fit, evaluate, version):
        app.command()(fn)
    app.command(name="register")(register_cmd)
