"""Scheduling commands: ``serve`` (the pipeline as a scheduled Prefect deployment, served here),
``deploy`` (the same deployment on a process work pool) and ``server`` (a Prefect server on
loopback).

* ``infrec server [--port 4200]`` — ``prefect server start --host 127.0.0.1 --port P --no-ui`` in
  the foreground, its database in ``<state_dir>/prefect`` unless ``PREFECT_HOME`` is set.
* ``infrec serve [--params params.yaml] [--name NAME]`` — a deployment ``infrec-pipeline/NAME``
  of the pipeline flow with the cron schedule of ``schedule:`` in params.yaml, served by this
  process (``prefect.serve``): runs execute here, in subprocesses. Against ``PREFECT_API_URL``
  when set; otherwise against a server on ``127.0.0.1:--server-port`` — the one ``infrec server``
  started if it answers, else one this command starts and stops with itself.
* ``infrec deploy --pool infrec [--params params.yaml] [--name NAME]`` — the same deployment
  registered with a ``process`` work pool (created if missing) on ``PREFECT_API_URL``; any machine
  running ``prefect worker start --pool infrec`` executes its runs.

Overlapping runs: the deployment has ``concurrency_limit=1`` (ENQUEUE: a run that comes due while
another runs waits for it), and the pipeline's versioning/registry stages hold the global
concurrency limit ``infrec-registry`` (:mod:`tasks.concurrency`), created here at start-up.

Only typer and the standard library at module level (Prefect is imported inside the commands,
after the API URL is settled).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

import typer

from infrec.cmd_pipeline import PARAMS_HELP, _cli, _params

DEFAULT_PORT = 4200
DEFAULT_DEPLOYMENT = "scheduled"
LOOPBACK = "127.0.0.1"


# -- Prefect server helpers (also used by the tests) ---------------------------------------------
def prefect_command() -> list[str]:
    """The ``prefect`` executable next to this Python (the venv's), else ``python -m prefect``."""
    exe = Path(sys.executable).parent / "prefect"
    if exe.is_file() and os.access(exe, os.X_OK):
        return [str(exe)]
    found = shutil.which("prefect")
    return [found] if found else [sys.executable, "-m", "prefect"]


def server_command(port: int = DEFAULT_PORT, host: str = LOOPBACK) -> list[str]:
    return [*prefect_command(), "server", "start", "--host", host, "--port", str(port), "--no-ui"]


def api_url(port: int, host: str = LOOPBACK) -> str:
    return f"http://{host}:{port}/api"


def is_healthy(url: str, timeout: float = 2.0) -> bool:
    """True when ``<url>/health`` answers 200 (``url`` is a Prefect API URL, ``.../api``)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(url: str, timeout: float = 120.0, process: Optional[subprocess.Popen] = None,
                 interval: float = 0.5) -> None:
    """Poll ``<url>/health`` until it answers; raise ``TimeoutError`` (or ``RuntimeError`` if
    ``process`` exits first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_healthy(url):
            return
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {process.returncode} "
                               f"before {url} became healthy")
        time.sleep(interval)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f}s")


def stop_process(process: subprocess.Popen, grace: float = 20.0) -> Optional[int]:
    """terminate → wait ``grace`` s → kill → wait. Returns the exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
    return process.returncode


def server_environment(state_dir: str | Path) -> dict[str, str]:
    """Environment of a Prefect server: ``PREFECT_HOME`` under the state dir unless set; no
    analytics."""
    env = dict(os.environ)
    env.setdefault("PREFECT_HOME", str(Path(state_dir) / "prefect"))
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    return env


# -- the deployment ------------------------------------------------------------------------------
def check_schedule(params) -> Any:
    """``params.schedule``, checked by Prefect's own validator (cron syntax, time zone)."""
    from prefect.client.schemas.schedules import CronSchedule

    from tasks.errors import InputError

    sched = params.schedule
    try:
        CronSchedule(cron=sched.cron, timezone=sched.timezone)
    except ValueError as exc:
        errors = exc.errors() if hasattr(exc, "errors") else None
        message = errors[0]["msg"] if errors else str(exc)
        raise InputError(f"schedule.cron {sched.cron!r}: {message}") from None
    return sched


def build_deployment(params, name: str = DEFAULT_DEPLOYMENT,
                     input_path: Optional[str] = None) -> Any:
    """The pipeline flow as a ``RunnerDeployment``: cron schedule from ``params.schedule``,
    one run at a time (``concurrency_limit=1``, later runs enqueued), resolved params as the
    default parameters. Raises :class:`tasks.errors.InputError` on a bad schedule."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from flows.pipeline import pipeline

    sched = check_schedule(params)
    return pipeline.to_deployment(
        name=name,
        schedules=[Cron(sched.cron, timezone=sched.timezone)],
        concurrency_limit=ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        parameters={"params": params.model_dump(mode="json"), "input_path": input_path},
        description="infrec pipeline: ingest → distill → fit → evaluate → register → promote",
        tags=["infrec"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def _configured_api_url() -> Optional[str]:
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    from prefect.settings import get_current_settings  # a profile may set it

    url = get_current_settings().api.url
    return str(url) if url else None


def serve(
    params: Optional[Path] = typer.Option(None, "--params", "-p", help=PARAMS_HELP),
    name: str = typer.Option(DEFAULT_DEPLOYMENT, "--name", "-n",
                             help="Deployment name (the deployment is infrec-pipeline/NAME)."),
    input: Optional[Path] = typer.Option(
        None, "--input", "-i", help="Interactions file each run ingests (default: ingest.input "
        "from params, else the embedded synthetic data)."),
    server_port: int = typer.Option(
        DEFAULT_PORT, "--server-port", help="Without PREFECT_API_URL: the local server's port on "
        "127.0.0.1 (used if it answers, else started and stopped with this command)."),
    startup_timeout: float = typer.Option(120.0, help="Seconds to wait for a started server."),
) -> None:
    """Serve the pipeline as a Prefect deployment on the cron schedule of params.yaml."""
    cli = _cli()
    p = _params(params)
    if input is not None and not input.is_file():
        cli._fail(f"{input}: input file not found")
    source = str(input.resolve()) if input is not None else None
    cli._run_guarded(check_schedule, p)

    server = None
    url = _configured_api_url()
    if url is None:
        url = api_url(server_port)
        if not is_healthy(url):
            typer.echo(f"starting a Prefect server on {url} (PREFECT_HOME "
                       f"{server_environment(p.state_dir)['PREFECT_HOME']})", err=True)
            Path(server_environment(p.state_dir)["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
            server = subprocess.Popen(server_command(server_port),
                                      env=server_environment(p.state_dir),
                                      stdin=subprocess.DEVNULL)
            try:
                wait_healthy(url, startup_timeout, process=server)
            except (TimeoutError, RuntimeError) as exc:
                stop_process(server)
                cli._fail(str(exc))
        os.environ["PREFECT_API_URL"] = url
    try:
        cli._run_guarded(_serve, p, name, source, url)
    finally:
        if server is not None:
            typer.echo("stopping the Prefect server", err=True)
            stop_process(server)


def _serve(p, name: str, source: Optional[str], url: str) -> None:
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.concurrency import REGISTRY_LIMIT, ensure_limit

    with temporary_settings(updates={PREFECT_API_URL: url}):
        deployment = build_deployment(p, name, source)
        ensure_limit(REGISTRY_LIMIT, 1)
        typer.echo(f"serving infrec-pipeline/{name} on {url}: cron '{p.schedule.cron}' "
                   f"({p.schedule.timezone}), one run at a time; state {p.state_dir}, "
                   f"MLflow {p.tracking_uri()}", err=True)
        prefect_serve(deployment, print_starting_message=False)


def ensure_process_pool(name: str) -> bool:
    """Create the ``process`` work pool ``name`` when missing; True when it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_work_pool(WorkPoolCreate(
                name=name, type="process",
                base_job_template=ProcessWorker.get_default_base_job_template()))
        except ObjectAlreadyExists:
            return False
        return True


def deploy(
    pool: str = typer.Option("infrec", "--pool", help="Process work pool (created if missing)."),
    params: Optional[Path] = typer.Option(None, "--params", "-p", help=PARAMS_HELP),
    name: str = typer.Option(DEFAULT_DEPLOYMENT, "--name", "-n",
                             help="Deployment name (the deployment is infrec-pipeline/NAME)."),
    input: Optional[Path] = typer.Option(
        None, "--input", "-i", help="Interactions file each run ingests (a path every worker "
        "can read)."),
) -> None:
    """Register the scheduled deployment with a process work pool; `prefect worker start --pool
    POOL` on any machine (infrec installed, PREFECT_API_URL set) runs it."""
    cli = _cli()
    p = _params(params)
    if not os.environ.get("PREFECT_API_URL"):
        cli._fail("set PREFECT_API_URL to the Prefect server the workers use "
                  "(e.g. http://10.0.0.1:4200/api)")
    source = str(input.resolve()) if input is not None else None
    cli._run_guarded(_deploy, p, name, source, pool)


def _deploy(p, name: str, source: Optional[str], pool: str) -> None:
    from tasks.concurrency import REGISTRY_LIMIT, ensure_limit

    created = ensure_process_pool(pool)
    deployment = build_deployment(p, name, source)
    deployment_id = deployment.apply(work_pool_name=pool)
    ensure_limit(REGISTRY_LIMIT, 1)
    typer.echo(f"deployment infrec-pipeline/{name} ({deployment_id}) in work pool {pool}"
               f"{' (created)' if created else ''}: cron '{p.schedule.cron}' "
               f"({p.schedule.timezone}); start workers with: prefect worker start --pool {pool}")


def server(
    port: int = typer.Option(DEFAULT_PORT, "--port", help="Port on 127.0.0.1."),
    params: Optional[Path] = typer.Option(None, "--params", "-p", help=PARAMS_HELP),
) -> None:
    """Start a Prefect server on 127.0.0.1 (foreground; no UI). Then: export PREFECT_API_URL."""
    from infrec.config import load_params

    p = _cli()._run_guarded(load_params, params).resolved()
    env = server_environment(p.state_dir)
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    cmd = server_command(port)
    typer.echo(f"Prefect server on {api_url(port)} (PREFECT_HOME {env['PREFECT_HOME']}); "
               f"use it with: export PREFECT_API_URL={api_url(port)}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, env)  # foreground: Ctrl-C / SIGTERM go straight to the server


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(deploy)
    app.command()(server)
