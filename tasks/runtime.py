"""What every stage shares at run time: the process environment, Prefect task options, a logger
that works inside and outside a flow run, and child processes that die with their parent.

Nothing happens at import: entry points call :func:`apply_environment` once.
"""

from __future__ import annotations

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

    ``OPENBLAS_NUM_THREADS=1``: the pipeline's BLAS calls are small (≤ a few thousand rows) and
    multi-threaded OpenBLAS spin-waits when the cores are shared — measured on a 2-core machine
    under load: EASE + the full-data reference 38 s with the default threads, 5 s with one.
    """
    defaults = {"OPENBLAS_NUM_THREADS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "DVC_NO_ANALYTICS": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
                # a run's own log lines are enough; Prefect's per-task "Finished in state" noise
                # stays in the UI
                "PREFECT_LOGGING_LEVEL": "INFO"}
    return {k: v for k, v in defaults.items() if k not in os.environ}


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


def _not_transient() -> tuple[type[BaseException], ...]:
    import numpy as np

    return (InputError, ValueError, TypeError, KeyError, MemoryError, FloatingPointError,
            np.linalg.LinAlgError)


def retry_transient(_task: Any, _task_run: Any, state: Any) -> bool:
    """Retry unless the failure is deterministic (bad input, bad numbers): retrying those only
    delays the one-line error the user gets."""
    from tasks import stop

    if stop.requested():  # told to stop: a failure now is the stop's (a child killed with us)
        return False
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001 - unreadable result: treat as transient
            return True
    if isinstance(exc, _not_transient()):
        return False
    code = getattr(exc, "error_code", None)  # MlflowException: only server-side trouble is retried
    return code is None or code in _TRANSIENT_MLFLOW_CODES


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


__all__ = ["fault_point", "process_tags", "flow_run_tag", "HOST", "process_defaults", "runtime_environment",
           "apply_environment", "say", "quiet", "task_options", "retry_transient", "run_child",
           "start_child"]
