"""Scale-out commands: ``sweep`` (λ grid or (budget, seed) summaries on Dask) and
``mlflow-server`` (MLflow tracking server on loopback).

* ``infrec sweep --data DIR [--lambdas 0,1,5] [--address tcp://host:8786] [--workers 2]`` — the
  λ grid of ∞-AE as Prefect tasks mapped over a ``DaskTaskRunner`` (``flows/sweep.py``); with
  ``--budgets 50,100 [--seeds 0,1,2] [--sampler random]`` a summary sweep instead. Prints one JSON
  object (best point, every point).
* ``infrec mlflow-server [--port 5000]`` — ``mlflow server --host 127.0.0.1 --port P
  --backend-store-uri sqlite:///mlflow.db`` (the pipeline's default database) with artifacts proxied to
  ``<state_dir>/mlartifacts`` (``--artifacts-destination``; ``s3://…`` etc. by option), or
  written by clients to ``--default-artifact-root``. ``--backend-store-uri postgresql://…`` for
  Postgres. Foreground. Clients: ``MLFLOW_TRACKING_URI=http://127.0.0.1:5000``.

Only typer and the standard library at module level.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from infrec.common import PARAMS_HELP, fail, guarded, load, stoppable


def _parse_ints(text: Optional[str], option: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.replace(" ", ",").split(",") if v.strip()]
    except ValueError:
        fail(f"{option}: expected comma-separated integers, got {text!r}")
    if not values:
        fail(f"{option}: expected comma-separated integers, got {text!r}")
    return values


def _parse_floats(text: Optional[str], option: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{option}: expected comma-separated numbers, got {text[:60]!r}")
    if not values or any(not (v >= 0) or v == float("inf") for v in values):
        fail(f"{option}: expected finite non-negative numbers, got {text[:60]!r}")
    return values


def sweep(
    data: Path = typer.Option(..., "--data", "-d",
                              help="Ingested data directory (on every worker)."),
    lambdas: Optional[str] = typer.Option(
        None, help="Comma-separated λ grid (default: fit.lambdas of params, fit.summary_lambdas "
        "with --support)."),
    depth: Optional[int] = typer.Option(None, min=1, max=8,
                                        help="ReLU layers (default fit.depth)."),
    support: Optional[Path] = typer.Option(None, "--support", help="Fit on this summary file."),
    user_support: Optional[float] = typer.Option(
        None, help="Fit on a random user sample: a fraction (≤1) or a count (>1)."),
    seed: int = typer.Option(0, help="Seed of the user sample (with --user-support)."),
    budgets: Optional[str] = typer.Option(
        None, help="Summary sweep: comma-separated user budgets (one summary per budget × seed)."),
    seeds: str = typer.Option("0", help="Summary sweep: comma-separated seeds."),
    sampler: Optional[str] = typer.Option(
        None, help="Summary sweep: distill-cf, random or head (default distill.sampler)."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Summary sweep: directory for the summaries "
        "(default <state_dir>/sweeps/<time>)."),
    metric: Optional[str] = typer.Option(None, help="Validation metric that picks the best point "
                                         "(default: selection.metric)."),
    address: Optional[str] = typer.Option(
        None, "--address", help="An existing Dask scheduler, e.g. tcp://10.0.0.5:8786 (default: a "
        "local cluster)."),
    workers: int = typer.Option(2, min=1, help="Workers of the local cluster."),
    processes: Optional[bool] = typer.Option(
        None, "--processes/--threads", help="Local cluster of worker processes or threads "
        "(default: processes with PREFECT_API_URL, threads in ephemeral mode)."),
    params: Optional[Path] = typer.Option(None, "--params", "-p", help=PARAMS_HELP),
) -> None:
    """Sweep the λ grid (or summary budgets × seeds) as Prefect tasks on a Dask cluster."""
    from models.metrics import METRIC_KEYS

    p = load(params)
    if not (data / "manifest.json").is_file():
        fail(f"{data}: not a data directory (run `infrec ingest` first)")
    metric = metric or p.selection.metric
    if metric not in METRIC_KEYS:
        fail(f"--metric: unknown metric {metric!r} (one of {', '.join(METRIC_KEYS)})")
    if support is not None and not support.is_file():
        fail(f"{support}: summary file not found")
    if budgets is not None:
        from flows.sweep import run_summary_sweep

        d = p.distill
        chosen = sampler or d.sampler
        options = {"steps": d.steps, "samples": d.samples, "tau": d.tau, "lr": d.lr,
                   "reg": d.reg, "patience": d.patience, "min_steps": d.min_steps,
                   "eval_every": d.eval_every,
                   "target_batch": d.target_batch, "lambdas": tuple(p.fit.summary_lambdas),
                   "select_metric": metric, "depth": depth or p.fit.depth}
        out_dir = out or p.state_path() / "sweeps" / time.strftime("%Y%m%d-%H%M%S")
        with stoppable("infrec sweep"):
            result = guarded(
                run_summary_sweep, data, out_dir, chosen, _parse_ints(budgets, "--budgets"),
                _parse_ints(seeds, "--seeds"), address=address, workers=workers,
                processes=processes, options=options, select_metric=metric)
    else:
        from flows.sweep import run_lambda_sweep

        grid = _parse_floats(lambdas, "--lambdas")
        if grid is None:
            grid = p.fit.summary_lambdas if support is not None else p.fit.lambdas
        with stoppable("infrec sweep"):
            result = guarded(
                run_lambda_sweep, data, grid, address=address, workers=workers,
                processes=processes, depth=depth or p.fit.depth,
                support_path=str(support.resolve()) if support else None,
                user_support=user_support, seed=seed, batch_size=p.fit.batch_size,
                select_metric=metric)
    typer.echo(json.dumps(result))


def mlflow_server_command(port: int, backend_store_uri: str, *, host: str = "127.0.0.1",
                          artifacts_destination: Optional[str] = None,
                          default_artifact_root: Optional[str] = None,
                          workers: int = 1) -> list[str]:
    """The ``mlflow server`` command line (the venv's ``mlflow`` when there is one)."""
    exe = Path(sys.executable).parent / "mlflow"
    cmd = [str(exe)] if exe.is_file() else [shutil.which("mlflow") or "mlflow"]
    cmd += ["server", "--host", host, "--port", str(port), "--backend-store-uri",
            backend_store_uri, "--workers", str(workers)]
    if default_artifact_root:
        cmd += ["--default-artifact-root", default_artifact_root]
    if artifacts_destination:
        cmd += ["--artifacts-destination", artifacts_destination]
    return cmd


def mlflow_server(
    port: int = typer.Option(5000, "--port", help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface (loopback by default). For "
                             "other machines bind a private address (private IPs are allowed "
                             "hosts; others via MLFLOW_SERVER_ALLOWED_HOSTS)."),
    backend_store_uri: Optional[str] = typer.Option(
        None, "--backend-store-uri", help="Tracking + registry DB (default: the pipeline's, "
        "sqlite:///mlflow.db in the workspace; e.g. postgresql://user:pw@db/mlflow)."),
    artifacts_destination: Optional[str] = typer.Option(
        None, "--artifacts-destination", help="Where the server stores the artifacts it proxies "
        "(default <state_dir>/mlartifacts; e.g. s3://bucket/mlflow)."),
    default_artifact_root: Optional[str] = typer.Option(
        None, "--default-artifact-root", help="Instead of proxying: the artifact root of new "
        "experiments, written by the clients themselves (they need access to it)."),
    workers: int = typer.Option(1, min=1, help="Server worker processes."),
    params: Optional[Path] = typer.Option(None, "--params", "-p", help=PARAMS_HELP),
) -> None:
    """Start an MLflow tracking server (SQLite on loopback by default; foreground)."""
    from tasks.params import load_params

    p = guarded(load_params, params)
    state = p.state_path()
    if backend_store_uri is None:
        uri = p.tracking_uri()
        backend_store_uri = uri if not uri.startswith(("http://", "https://")) else \
            f"sqlite:///{p.workspace_path() / 'mlflow.db'}"
    if backend_store_uri.startswith("sqlite:///"):
        Path(backend_store_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    if default_artifact_root is None and artifacts_destination is None:
        artifacts_destination = str(state / "mlartifacts")
    if artifacts_destination and "://" not in artifacts_destination:
        Path(artifacts_destination).mkdir(parents=True, exist_ok=True)
    cmd = mlflow_server_command(port, backend_store_uri, host=host,
                                artifacts_destination=artifacts_destination,
                                default_artifact_root=default_artifact_root, workers=workers)
    typer.echo(f"MLflow server on http://{host}:{port} (backend {backend_store_uri}); use it "
               f"with: export MLFLOW_TRACKING_URI=http://{host}:{port}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    env = dict(os.environ)
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.execvpe(cmd[0], cmd, env)


def register(app: typer.Typer) -> None:
    app.command()(sweep)
    app.command(name="mlflow-server")(mlflow_server)
