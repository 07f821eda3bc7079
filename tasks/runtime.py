"""What every stage shares at run time: the process environment, Prefect task options, a logger
that works inside and outside a flow run, and child processes that die with their parent.

Nothing happens at import: entry points call :func:`apply_environment` once.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from tasks.errors import InputError
from tasks.params import Params, redact


# -- environment --------------------------------------------------------------------------------
def process_defaults() -> dict[str, str]:
    """Environment defaults (never overriding what is set), applied before NumPy is imported.

    BLAS threads are not set here: :func:`blas_threads_for` picks them per data set.
    """
    defaults = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "DVC_NO_ANALYTICS": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
                # a run's own log lines are enough; Prefect's per-task "Finished in state" noise
                # stays in the UI
                "PREFECT_LOGGING_LEVEL": "INFO"}
    return {k: v for k, v in defaults.items() if k not in os.environ}


# data of at least this many cells (users × items) uses every core for BLAS; smaller data one
# thread: its products are small, and multi-threaded OpenBLAS spin-waits when the cores are
# shared (measured on a 2-core machine under load: EASE + the full-data reference 38 s with two
# threads, 5 s with one). ML-1M (6,040 × 3,706) and the embedded default stay below it.
BLAS_ALL_CORES_MIN_CELLS = 50_000_000


def blas_threads_for(n_users: int, n_items: int) -> int:
    """Set the BLAS threads of this process for data of ``n_users × n_items`` (every core the
    process may use at or above :data:`BLAS_ALL_CORES_MIN_CELLS`, else one) unless
    ``OPENBLAS_NUM_THREADS``/``OMP_NUM_THREADS`` is set (the user's or a test's choice wins).
    Returns the threads now in effect (None-safe: 0 when threadpoolctl is missing)."""
    if os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ.get("OPENBLAS_NUM_THREADS") or os.environ["OMP_NUM_THREADS"])
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is in the pinned set
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, int(cores or 1)) if n_users * n_items >= BLAS_ALL_CORES_MIN_CELLS else 1
    threadpool_limits(limits=threads, user_api="blas")
    return threads


def runtime_environment(params: Params) -> dict[str, str]:
    """Environment variables an entry point sets before importing Prefect (none already set).

    Without a Prefect API (``PREFECT_API_URL``/``PREFECT_HOME`` unset) Prefect's home is
    ``<state_dir>/prefect``; the user's profiles file stays in effect. Compiled XLA programs
    persist in ``<state_dir>/jax-cache`` (on a GPU each new shape costs seconds of compilation).
    """
    env: dict[str, str] = process_defaults()
    state = params.state_path()
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        env["JAX_COMPILATION_CACHE_DIR"] = str(state / "jax-cache")
    if not os.environ.get("PREFECT_API_URL") and not os.environ.get("PREFECT_HOME"):
        env["PREFECT_HOME"] = str(state / "prefect")
        profiles = Path.home() / ".prefect" / "profiles.toml"
        if profiles.is_file() and not os.environ.get("PREFECT_PROFILES_PATH"):
            env["PREFECT_PROFILES_PATH"] = str(profiles)
    return env


def apply_environment(params: Params) -> None:
    """Set :func:`runtime_environment` in this process (and create Prefect's home)."""
    state = params.state_path()
    if state.exists() and not state.is_dir():
        raise InputError(f"state_dir {state}: exists and is not a directory")
    env = runtime_environment(params)
    if "PREFECT_HOME" in env:
        try:
            Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"state_dir {state}: cannot create {env['PREFECT_HOME']}: "
                             f"{exc.strerror or exc}") from None
    os.environ.update(env)


# -- logging --------------------------------------------------------------------------------------
_STDERR = logging.getLogger("infrec")


def say() -> Callable[[str], None]:
    """``info(message)`` of the Prefect run logger inside a flow/task run, else of a stderr
    logger (the CLI's stage commands). Messages are redacted of credentials."""
    try:
        from prefect.context import FlowRunContext, TaskRunContext

        if TaskRunContext.get() or FlowRunContext.get():
            from prefect.logging import get_run_logger

            logger = get_run_logger()
            return lambda message: logger.info(redact(message))
    except ImportError:  # pragma: no cover - Prefect is a dependency
        pass
    if not _STDERR.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        _STDERR.addHandler(handler)
        _STDERR.setLevel(logging.INFO)
        _STDERR.propagate = False
    return lambda message: _STDERR.info(redact(message))


def quiet() -> Callable[[str], None]:
    return lambda _message: None


# -- Prefect task options ------------------------------------------------------------------------
_TRANSIENT_MLFLOW_CODES = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED",
                           "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "ABORTED")
# OS errors of a connection or a busy resource: the same call may succeed a second later
_TRANSIENT_ERRNOS = frozenset(getattr(errno, name) for name in (
    "ECONNREFUSED", "ECONNRESET", "ECONNABORTED", "ETIMEDOUT", "EPIPE", "EAGAIN", "EBUSY",
    "EHOSTUNREACH", "ENETUNREACH", "ENETDOWN") if hasattr(errno, name))


def _transient_here(exc: BaseException) -> bool:
    """Is this one exception (not its causes) known to be transient?"""
    if isinstance(exc, (ConnectionError, TimeoutError)):  # refused, reset, broken pipe, timeouts
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    text = str(exc).lower()
    # a locked SQLite (MLflow's or Prefect's database), whichever library raised it
    if "database is locked" in text or "database table is locked" in text:
        return True
    if getattr(exc, "error_code", None) in _TRANSIENT_MLFLOW_CODES:  # MLflow: server-side trouble
        return True
    names = {cls.__module__.split(".")[0] + "." + cls.__name__ for cls in type(exc).__mro__}
    # the HTTP clients' own connection and timeout errors (Prefect: httpx; MLflow: requests)
    return bool(names & {"httpx.TransportError", "requests.ConnectionError", "requests.Timeout",
                         "urllib3.ProtocolError", "urllib3.NewConnectionError"})


def is_transient(exc: BaseException) -> bool:
    """True only for errors known to be transient — a connection refused or reset, a timeout, a
    locked SQLite, MLflow's server-side codes — here or anywhere in the chain of causes (MLflow and
    Prefect wrap them). Everything else (bad input, bad numbers, a bug) is not retried: retrying
    it only delays the one-line error the user gets."""
    from tasks.stop import Interrupted

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (InputError, Interrupted)):  # the user's input, or told to stop
            return False
        if _transient_here(exc):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return False


def retry_transient(_task: Any, _task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn`` of the stages that touch files or services: retry an
    allow-listed transient error (:func:`is_transient`), never after a stop request."""
    from tasks import stop

    if stop.requested():  # told to stop: a failure now is the stop's (a child killed with us)
        return False
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001 - unreadable result: nothing says it was transient
            return False
    return isinstance(exc, BaseException) and is_transient(exc)


def task_options(io: bool = True) -> dict[str, Any]:
    """Options of every stage task: no cross-run caching or result persistence (results are
    small and recomputed); tasks touching files or services retry transient errors twice."""
    from prefect.cache_policies import NO_CACHE

    base: dict[str, Any] = dict(cache_policy=NO_CACHE, persist_result=False)
    if io:
        base.update(retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=retry_transient)
    return base


# -- who is writing ---------------------------------------------------------------------------------
HOST = socket.gethostname()


def process_tags() -> dict[str, str]:
    """Tags naming this process, so that the next start can tell a crashed writer's leftovers
    (its process is gone) from a live one's (:mod:`tasks.recovery`)."""
    return {"infrec.pid": str(os.getpid()), "infrec.host": HOST}


def flow_run_tag() -> str:
    return f"pid-{os.getpid()}-{HOST}"


# -- fault injection -------------------------------------------------------------------------------
FAULT_ENV = "INFREC_FAULT"


def fault_point(name: str) -> None:
    """Die here by SIGKILL when ``INFREC_FAULT`` names this point (the fault-injection tests kill
    a writer at exact moments this way: ingest, distill, dvc-commit, dvc-push, model-logging,
    registration, alias-move, rollback-fetch, rollback-checkout, rollback-aliases)."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


# -- child processes ------------------------------------------------------------------------------
# PR_SET_PDEATHSIG(SIGKILL): the kernel kills the child when its parent dies, even by SIGKILL.
# util-linux's `setpriv --pdeathsig KILL` sets it and execs the command (no Python code runs
# between fork and exec, which matters in a process with JAX's threads); without setpriv, a
# preexec_fn calls prctl through a libc handle loaded beforehand.
_SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None
_PRCTL = None


def _load_prctl():
    global _PRCTL
    if _PRCTL is None and sys.platform.startswith("linux"):
        try:
            import ctypes

            _PRCTL = ctypes.CDLL("libc.so.6", use_errno=True).prctl
        except OSError:  # pragma: no cover
            _PRCTL = False
    return _PRCTL


def _child_args(args: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    args = list(args)
    if _SETPRIV:
        return [_SETPRIV, "--pdeathsig", "KILL", "--", *args], {}
    prctl = _load_prctl()
    if not prctl:
        return args, {}
    parent = os.getpid()

    def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
        prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return args, {"preexec_fn": die_with_parent}


def run_child(args: Sequence[str], *, cwd: str | Path | None = None,
              env: Optional[dict[str, str]] = None, input: Optional[str | bytes] = None,
              timeout: Optional[float] = None, text: bool = True) -> subprocess.CompletedProcess:
    """``subprocess.run`` (captured output, text unless ``text=False``) of a child that dies
    with this process."""
    argv, extra = _child_args(args)
    return subprocess.run(argv, cwd=cwd, env=env, input=input, capture_output=True, text=text,
                          timeout=timeout, **extra)


def start_child(args: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen`` of a child that dies with this process (SIGKILL included)."""
    argv, extra = _child_args(args)
    return subprocess.Popen(argv, **extra, **kwargs)


__all__ = ["fault_point", "process_tags", "flow_run_tag", "HOST", "process_defaults", "blas_threads_for",
           "runtime_environment",
           "apply_environment", "say", "quiet", "task_options", "retry_transient", "run_child",
           "start_child"]
