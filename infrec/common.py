"""What every command shares: one-line errors, params loading, the temporary Prefect server.

Only Typer and the standard library at module level: NumPy, Prefect, MLflow and JAX are
imported inside commands, after the runtime environment is applied.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer

PARAMS_HELP = "Parameters file (default: ./params.yaml if present, else built-in defaults)."
DEFAULT_PREFECT_PORT = 4200
LOOPBACK = "127.0.0.1"


def fail(message: str, code: int = 2) -> None:
    """Print ``error: message`` (one line, credentials redacted) and exit with ``code``."""
    from tasks.params import redact

    typer.echo(f"error: {redact(message)}", err=True)
    raise typer.Exit(code=code)


def guarded(fn, *args, **kwargs):
    """Call ``fn``; bad input (``InputError``), a refused lock wait or a DVC/git failure becomes
    one line and exit code 2 (no traceback)."""
    from tasks import stop
    from tasks.dvc import VersioningError
    from tasks.errors import InputError

    try:
        return fn(*args, **kwargs)
    except (InputError, VersioningError, TimeoutError) as exc:
        if stop.requested():  # e.g. a DVC child killed by the same signal: `stoppable` says it
            raise
        if isinstance(exc, TimeoutError):
            fail(f"{exc} (another infrec run, rollback or promotion holds the writer lock)")
        fail(str(exc))


@contextmanager
def stoppable(what: str, params=None, defer: Optional[str] = None) -> Iterator[None]:
    """SIGTERM/SIGINT end the command in this block (at once, or — inside ``defer``'s region
    and the pipeline flow — at the next safe point, :mod:`tasks.stop`): one line saying what was
    interrupted and that nothing was promoted, exit code 143 (SIGTERM) or 130 (SIGINT).
    ``params``: the run's, whose ``last_run.json`` names the interrupted flow run."""
    from tasks import stop

    try:
        with stop.handling(), (stop.deferred(defer) if defer else _nothing()):
            yield
    except (typer.Exit, SystemExit):
        raise
    except BaseException as exc:
        if not (stop.requested() or isinstance(exc, KeyboardInterrupt)):
            raise
        fail(_stopped_line(what, params, exc), code=stop.exit_code() if stop.requested() else 130)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _stopped_line(what: str, params, exc: BaseException) -> str:
    from tasks import stop

    signum = stop.received() or 2
    record = None
    if params is not None:
        from tasks.recovery import last_run

        record = last_run(params.state_path())
        if record and record.get("pid") != os.getpid():
            record = None  # an earlier run's
    if record and record.get("outcome") != "interrupted":  # the signal came after the flow ended
        return (f"interrupted: {what} stopped by {stop.signal_name(signum)} after its run ended "
                f"({record['outcome']}: {record['message']})")
    if record:
        run = record.get("flow_run_name") or record.get("flow_run_id")
        state = ("Cancelled" if record.get("prefect_recorded", True) else
                 "Prefect API unreachable, the next run marks it Crashed")
        return (f"interrupted: {what} {record['message']} (flow run {run}: {state}); its "
                "lock is released and nothing half-written is left")
    where = exc.where if isinstance(exc, stop.Interrupted) and exc.where else None
    return (f"interrupted: {what} stopped by {stop.signal_name(signum)}"
            + (f" during {where}" if where else "") + "; nothing was promoted")


def params_option() -> Any:
    return typer.Option(None, "--params", "-p", help=PARAMS_HELP)


def load(path: Optional[Path]):
    """Parse and validate the params file (all of it, before anything runs), apply the runtime
    environment, and return the params."""
    from tasks.runtime import process_defaults

    os.environ.update(process_defaults())  # before anything imports NumPy
    from tasks.params import load_params
    from tasks.runtime import apply_environment

    params = guarded(load_params, path)
    guarded(apply_environment, params)
    return params


@contextmanager
def locked(params, wait: Optional[float] = None) -> Iterator[None]:
    """The writer lock of the state dir (waiting at most ``wait`` seconds; None: as long as it
    takes), then crash recovery; a lock that stays taken is one line and exit code 2."""
    from tasks.concurrency import writer_lock
    from tasks.recovery import recover

    lock = writer_lock(params, timeout_seconds=wait)
    try:
        lock.__enter__()
    except TimeoutError:
        fail(f"the writer lock of {params.state_path()} is held by another infrec run, rollback "
             f"or promotion (waited {wait:g}s); nothing changed")
    try:
        guarded(recover, params, prefect=False)
        yield
    except BaseException as exc:
        if not lock.__exit__(type(exc), exc, exc.__traceback__):
            raise
    else:
        lock.__exit__(None, None, None)


def say_err(quiet: bool = False):
    return (lambda _m: None) if quiet else (lambda m: typer.echo(m, err=True))


# -- Prefect: a server that dies with us ---------------------------------------------------------
def is_healthy(url: str, timeout: float = 2.0) -> bool:
    """True when ``<url>/health`` answers 200 (``url`` is a Prefect API URL, ``.../api``)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(url: str, timeout: float = 120.0, process=None, interval: float = 0.3) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_healthy(url):
            return
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {process.returncode} "
                               f"before {url} became healthy")
        time.sleep(interval)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f}s")


def api_url(port: int, host: str = LOOPBACK) -> str:
    return f"http://{host}:{port}/api"


def prefect_command() -> list[str]:
    """The ``prefect`` executable next to this Python (the venv's), else ``python -m prefect``."""
    exe = Path(sys.executable).parent / "prefect"
    if exe.is_file() and os.access(exe, os.X_OK):
        return [str(exe)]
    return [sys.executable, "-m", "prefect"]


def server_command(port: int, host: str = LOOPBACK, ui: bool = True) -> list[str]:
    return [*prefect_command(), "server", "start", "--host", host, "--port", str(port),
            *([] if ui else ["--no-ui"])]


def server_environment(state_dir: str | Path, port: int, host: str = LOOPBACK) -> dict[str, str]:
    """A Prefect server's environment: its home under the state dir (unless PREFECT_HOME is
    set), no analytics, and the UI pointed at this server's API."""
    env = dict(os.environ)
    env.setdefault("PREFECT_HOME", str(Path(state_dir) / "prefect"))
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env["PREFECT_UI_API_URL"] = api_url(port, host)
    env.pop("PREFECT_API_URL", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def configured_api_url() -> Optional[str]:
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    from prefect.settings import get_current_settings  # a profile may set it

    url = get_current_settings().api.url
    return str(url) if url else None


def stop_process(process, grace: float = 20.0) -> Optional[int]:
    """terminate → wait ``grace`` s → kill → wait. Returns the exit code."""
    import subprocess

    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
    return process.returncode


@contextmanager
def prefect_api(params, startup_timeout: float = 120.0) -> Iterator[str]:
    """A Prefect API for the commands that run flows: ``PREFECT_API_URL`` (or a profile's) when
    configured; else the ``infrec server`` on 127.0.0.1:4200 when one answers; else a temporary
    server on a free loopback port that this process starts — as a child that dies with it,
    even on SIGKILL — with its database in ``<state_dir>/prefect`` (so ``infrec server`` shows
    the run later), stopped when the block ends."""
    from tasks.concurrency import TEMPORARY_SERVER_ENV
    from tasks.runtime import start_child

    url = configured_api_url()
    if url:
        yield url
        return
    local = api_url(DEFAULT_PREFECT_PORT)
    if is_healthy(local, timeout=0.5):
        with using_api(local):
            yield local
        return
    port = free_port()
    url = api_url(port)
    env = server_environment(params.state_path(), port)
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    log_file = open(Path(env["PREFECT_HOME"]) / "temporary-server.log", "ab")
    # its own session: a SIGTERM/SIGINT to our process group (a scheduler, Ctrl-C) does not stop
    # it before the flow has reported how it ended; we stop it below (or it dies with us)
    server = start_child(server_command(port, ui=False), env=env, stdin=open(os.devnull),
                         stdout=log_file, stderr=log_file, start_new_session=True)
    try:
        wait_healthy(url, startup_timeout, process=server)
        os.environ[TEMPORARY_SERVER_ENV] = "1"
        with using_api(url):
            try:
                yield url
            finally:
                drain_prefect()  # before the server goes: logs and events still queued
    finally:
        os.environ.pop(TEMPORARY_SERVER_ENV, None)
        stop_process(server, grace=10)
        log_file.close()


def drain_prefect(timeout: float = 10.0) -> None:
    """Send Prefect's queued logs and events now (they would retry against a stopped server for
    over a minute at exit)."""
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=timeout)
        EventsWorker.drain_all(timeout=timeout)
    except Exception:  # noqa: BLE001 - best effort
        pass


@contextmanager
def using_api(url: str) -> Iterator[None]:
    """Talk to the Prefect API at ``url`` in this process (settings) and its children (env)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before


__all__ = ["fail", "guarded", "stoppable", "load", "params_option", "prefect_api",
           "PARAMS_HELP"]
