"""Scheduling commands: ``serve`` (the pipeline as a scheduled Prefect deployment, served here),
``deploy`` (the same deployment on a process work pool) and ``server`` (a Prefect server on
loopback).

* ``infrec server [--port 4200]`` — ``prefect server start --host 127.0.0.1 --port P`` with its
  UI (pointed at this API) in the foreground, its database in ``<state_dir>/prefect`` unless
  ``PREFECT_HOME`` is set — the same database ``infrec run``'s temporary servers write, so the
  UI shows every past run.
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
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from infrec.common import (DEFAULT_PREFECT_PORT, api_url, configured_api_url, fail, guarded,
                           is_healthy, load, params_option, server_command, server_environment,
                           stop_process, using_api, wait_healthy)

DEFAULT_PORT = DEFAULT_PREFECT_PORT
DEFAULT_DEPLOYMENT = "scheduled"


# -- checks before anything starts ------------------------------------------------------------------
_BANNED = "/%&><"  # characters Prefect refuses in deployment and work pool names


def _vendored_croniter() -> Any:
    """Prefect's own cron parser (``prefect._vendor.croniter``, what its CronSchedule validates
    with), loaded from its file: importing the ``prefect`` package first takes seconds."""
    import importlib.util

    name = "prefect._vendor.croniter.croniter"
    if name in sys.modules:
        return sys.modules[name].croniter
    spec = importlib.util.find_spec("prefect")  # finds the package without importing it
    path = Path(next(iter(spec.submodule_search_locations))) / "_vendor" / "croniter" / "croniter.py"
    loaded = importlib.util.spec_from_file_location("_infrec_croniter", path)
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module.croniter


def check_args(p, name: str, *, input: Optional[Path] = None, pool: Optional[str] = None,
               server_port: Optional[int] = None, startup_timeout: Optional[float] = None) -> None:
    """Every argument and the params' schedule and input file, before anything is started or
    written (a one-line :class:`InputError`; about a second: Prefect itself is not imported).
    ``schedule.cron`` as Prefect's CronSchedule validates it (its own croniter, no random or
    hashed fields); ``schedule.timezone`` is checked by the params schema; ``--input`` (or
    ``ingest.input``) parsed whole, the first bad line named."""
    from tasks.errors import InputError

    for what, value in (("--name", name), ("--pool", pool)):
        if value is not None and (not value.strip() or any(c in value for c in _BANNED)):
            raise InputError(f"{what} {value!r}: a Prefect name, not empty and without any of "
                             f"{' '.join(_BANNED)}")
    if server_port is not None and not 1 <= server_port <= 65535:
        raise InputError(f"--server-port {server_port}: a TCP port is 1–65535")
    if startup_timeout is not None and not startup_timeout > 0:
        raise InputError(f"--startup-timeout {startup_timeout}: seconds, more than 0")
    cron = p.schedule.cron
    if not _vendored_croniter().is_valid(cron):
        raise InputError(f"schedule.cron {cron!r}: Invalid cron string: \"{cron}\"")
    if any(field.casefold() in ("r", "h") for field in cron.split()):
        raise InputError(f"schedule.cron {cron!r}: random and hashed expressions are unsupported")
    if input is not None and not input.is_file():
        raise InputError(f"{input}: input file not found")
    if input is not None or p.ingest.input is not None:  # polars is imported only for a file
        from tasks.ingest import validate_params_input

        validate_params_input(p, input)


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


def build_deployment(params, name: str = DEFAULT_DEPLOYMENT) -> Any:
    """The pipeline flow as a ``RunnerDeployment``: cron schedule from ``params.schedule``,
    one run at a time (``concurrency_limit=1``, later runs enqueued), resolved params as the
    default parameters. Raises :class:`tasks.errors.InputError` on a bad schedule."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from flows.pipeline import pipeline

    sched = check_schedule(params)
    # the resolved params (absolute paths) — never the tracking URI or other credentials: each
    # run reads MLFLOW_TRACKING_URI from its own environment
    return pipeline.to_deployment(
        name=name,
        schedules=[Cron(sched.cron, timezone=sched.timezone)],
        concurrency_limit=ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        parameters={"params": params.resolved().to_dict()},
        description="infrec pipeline: ingest → distill → fit → evaluate → register → promote",
        tags=["infrec"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def serve(
    params: Optional[Path] = params_option(),
    name: str = typer.Option(DEFAULT_DEPLOYMENT, "--name", "-n",
                             help="Deployment name (the deployment is infrec-pipeline/NAME)."),
    input: Optional[Path] = typer.Option(
        None, "--input", "-i", help="Interactions file each run ingests: the runs' ingest.input "
        "(default: ingest.input of the params, else the embedded synthetic data)."),
    server_port: int = typer.Option(
        DEFAULT_PORT, "--server-port", help="Without PREFECT_API_URL: the local server's port on "
        "127.0.0.1 (used if it answers, else started and stopped with this command)."),
    startup_timeout: float = typer.Option(120.0, help="Seconds to wait for a started server."),
) -> None:
    """Serve the pipeline as a Prefect deployment on the cron schedule of params.yaml."""
    p = load(params)
    # every argument, the schedule and the whole input file first: nothing written or started
    guarded(check_args, p, name, input=input, server_port=server_port,
            startup_timeout=startup_timeout)
    from infrec.cmd_pipeline import sync_input
    from tasks.version import check

    guarded(check_schedule, p)
    guarded(check, p)
    if input is not None:
        p = sync_input(p, params, input)

    server = None
    url = configured_api_url()
    if url is None:
        url = api_url(server_port)
        if not is_healthy(url):
            env = server_environment(p.state_path(), server_port)
            typer.echo(f"starting a Prefect server on {url} (PREFECT_HOME {env['PREFECT_HOME']})",
                       err=True)
            Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
            from tasks.runtime import start_child

            server = start_child(server_command(server_port), env=env, stdin=subprocess.DEVNULL,
                                 start_new_session=True)  # outlives our group's SIGTERM: see finally
            try:
                wait_healthy(url, startup_timeout, process=server)
            except (TimeoutError, RuntimeError) as exc:
                stop_process(server)
                fail(str(exc))
    try:
        with using_api(url):
            guarded(_serve, p, name, url)
    finally:
        if server is not None:
            typer.echo("stopping the Prefect server", err=True)
            stop_process(server)


def _serve(p, name: str, url: str) -> None:
    from prefect import serve as prefect_serve

    from tasks.concurrency import REGISTRY_LIMIT, ensure_limit
    from tasks.params import redact

    deployment = build_deployment(p, name)
    ensure_limit(REGISTRY_LIMIT, 1)
    typer.echo(f"serving infrec-pipeline/{name} on {url}: cron '{p.schedule.cron}' "
               f"({p.schedule.timezone}), one run at a time; state {p.state_path()}, "
               f"MLflow {redact(p.tracking_uri())}", err=True)
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
    params: Optional[Path] = params_option(),
    name: str = typer.Option(DEFAULT_DEPLOYMENT, "--name", "-n",
                             help="Deployment name (the deployment is infrec-pipeline/NAME)."),
    input: Optional[Path] = typer.Option(
        None, "--input", "-i", help="Interactions file each run ingests (a path every worker "
        "can read)."),
) -> None:
    """Register the scheduled deployment with a process work pool; `prefect worker start --pool
    POOL` on any machine (infrec installed, PREFECT_API_URL set) runs it."""
    from tasks.params import with_overrides

    p = load(params)
    guarded(check_args, p, name, input=input, pool=pool)  # before anything is contacted
    if not os.environ.get("PREFECT_API_URL"):
        fail("set PREFECT_API_URL to the Prefect server the workers use "
             "(e.g. http://10.0.0.1:4200/api)")
    if input is not None:
        p = guarded(with_overrides, p, {"ingest.input": str(input.resolve())}, "--input")
    guarded(_deploy, p, name, pool)


def _deploy(p, name: str, pool: str) -> None:
    from tasks.concurrency import REGISTRY_LIMIT, ensure_limit

    created = ensure_process_pool(pool)
    deployment = build_deployment(p, name)
    deployment_id = deployment.apply(work_pool_name=pool)
    ensure_limit(REGISTRY_LIMIT, 1)
    typer.echo(f"deployment infrec-pipeline/{name} ({deployment_id}) in work pool {pool}"
               f"{' (created)' if created else ''}: cron '{p.schedule.cron}' "
               f"({p.schedule.timezone}); start workers with: prefect worker start --pool {pool}")


def server(
    port: int = typer.Option(DEFAULT_PORT, "--port", help="Port on 127.0.0.1."),
    ui: bool = typer.Option(True, "--ui/--no-ui", help="Serve the Prefect UI too."),
    params: Optional[Path] = params_option(),
) -> None:
    """Start a Prefect server with its UI on 127.0.0.1 (foreground). Then: export
    PREFECT_API_URL=http://127.0.0.1:PORT/api, and open http://127.0.0.1:PORT."""
    from tasks.params import load_params

    p = guarded(load_params, params)
    env = server_environment(p.state_path(), port)
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    cmd = server_command(port, ui=ui)
    typer.echo(f"Prefect server on {api_url(port)}{' with its UI on http://127.0.0.1:' + str(port) if ui else ''} "
               f"(PREFECT_HOME {env['PREFECT_HOME']}); runs use it with: "
               f"export PREFECT_API_URL={api_url(port)}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, env)  # foreground: Ctrl-C / SIGTERM go straight to the server


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(deploy)
    app.command()(server)
