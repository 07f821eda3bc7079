"""Stop means stop: a run told to end (SIGTERM from a scheduler or ``timeout``, Ctrl-C's SIGINT, a
Prefect cancellation) ends within seconds, at a safe point, and every record says how it ended.

One process-wide flag. The signal handler sets it and raises :class:`Interrupted` at once only
where that is as harmless as a return: while the main thread is inside ``models/`` (pure NumPy/JAX,
no I/O — a Distill-CF step, a λ of a grid, a scoring batch, the EASE grid all end at the next
bytecode) and not inside JAX's compilation-cache writer. Everywhere else (writing a file, DVC, the
registry, Prefect's own reporting) it only sets the flag; :func:`check` raises at the next safe
point (every Distill-CF step, every λ, every stage boundary). A second signal raises at once.

Entry points::

    with stop.handling():          # CLI commands: SIGTERM/SIGINT raise Interrupted …
        with stop.deferred("fit"):   # … at safe points only in here
            run(params)

    @flow(...)
    @recovery.cancellable           # a flow run that is told to stop ends Cancelled
    def pipeline(params): ...

:class:`Interrupted` is a ``KeyboardInterrupt``: code that handles Ctrl-C already (asyncio,
``subprocess.run`` killing its child, thread pools) does the right thing, ``except Exception``
never swallows it and Prefect never retries it. Its ``exit_code`` is 128 + the signal (143 for
SIGTERM, 130 for SIGINT).

When stopping, Prefect's client stops retrying: a dead API costs one attempt per call (≈ 1.5 s
of httpx's own connection retries; measured, ≈ 8 s from SIGTERM to exit with the server
killed), not its retry schedule (minutes). What a stopped run records (task and flow run ``Cancelled``, MLflow runs
``KILLED``, ``last_run.json``) is :func:`tasks.recovery.cancellable`'s. No project imports here:
every stage's DVC deps include this file, and only this file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_ROOT = Path(__file__).resolve().parents[1]
_MODELS_DIR = str(_ROOT / "models") + os.sep
_OTHER_DIRS = tuple(str(_ROOT / name) + os.sep for name in ("tasks", "flows", "infrec"))
# inner frames where an exception could leave a file half-written (JAX's persistent
# compilation cache writes with Path.write_bytes) or a lock held
_UNSAFE_FILES = ("compilation_cache", "lru_cache", os.sep + "logging" + os.sep,
                 os.sep + "pathlib.py", os.sep + "shutil.py", os.sep + "tempfile.py",
                 "filelock")


class Interrupted(KeyboardInterrupt):
    """Raised at a safe point after SIGTERM/SIGINT (or a cancellation): ``signum``, ``where``
    (the stage or command that was running) and ``task_run_id`` (its Prefect task run)."""

    def __init__(self, signum: int, where: Optional[str] = None,
                 task_run_id: Optional[str] = None) -> None:
        self.signum, self.where, self.task_run_id = signum, where, task_run_id
        super().__init__(f"stopped by {signal_name(signum)}"
                         + (f" during {where}" if where else ""))

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


class _State:
    signum: Optional[int] = None
    event = threading.Event()
    deferred: list[str] = []   # labels of the deferred regions we are in
    finalizing = False
    at_signal: tuple[Optional[str], Optional[str]] = (None, None)  # _where() when it came


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def requested() -> bool:
    """True once a stop was asked for (any thread may ask)."""
    return _State.event.is_set()


def received() -> Optional[int]:
    """The signal that asked for the stop (None: none yet)."""
    return _State.signum


def exit_code() -> int:
    return 128 + int(_State.signum or signal.SIGTERM)


def request(signum: int = signal.SIGTERM) -> None:
    """Ask for a stop (what the signal handler does; tests and cancellations call it too)."""
    if _State.signum is None:
        _State.signum = int(signum)
    _State.event.set()
    _fail_fast()


def reset() -> None:
    """Forget a stop (a long-lived process that handled one; tests)."""
    _State.signum = None
    _State.event.clear()
    _State.finalizing = False
    _State.at_signal = (None, None)


def _where() -> tuple[Optional[str], Optional[str]]:
    """(what is running: the Prefect task's name or the deferred region's label, task run id)"""
    if "prefect.context" in sys.modules:  # never imported from here (a signal handler)
        try:
            from prefect.context import TaskRunContext

            ctx = TaskRunContext.get()
            if ctx is not None:
                return ctx.task.name, str(ctx.task_run.id)
        except Exception:  # noqa: BLE001 - outside a task run
            pass
    return (_State.deferred[-1] if _State.deferred else None), None


def interrupted() -> Interrupted:
    """The :class:`Interrupted` to raise here (where: the running task, else what was running
    when the signal came)."""
    where, task_run_id = _where()
    if where is None:
        where, task_run_id = _State.at_signal
    return Interrupted(_State.signum or signal.SIGTERM, where, task_run_id)


def check(*_args: Any, **_kwargs: Any) -> None:
    """Raise :class:`Interrupted` if a stop was asked for. Takes and ignores any arguments, so it
    can be a progress callback itself (``on_step=stop.check``)."""
    if _State.event.is_set() and not _State.finalizing:
        raise interrupted()


def check_before(stage: str) -> None:
    """At a stage boundary: raise :class:`Interrupted` (``where`` = "before <stage>") if a stop
    was asked for."""
    if _State.event.is_set() and not _State.finalizing:
        raise Interrupted(_State.signum or signal.SIGTERM, f"before {stage}")


# -- the signal handler --------------------------------------------------------------------------
def _at_safe_point(frame: Any) -> bool:
    """The innermost frame of this project's code is in ``models/`` and nothing it called is
    writing a file."""
    inner = []
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(_MODELS_DIR):
            return not any(marker in f for f in inner for marker in _UNSAFE_FILES)
        if name.startswith(_OTHER_DIRS):
            return False
        inner.append(name)
        frame = frame.f_back
    return False


def _handler(signum: int, frame: Any) -> None:
    first = _State.signum is None
    if first:
        _State.at_signal = _where()
    request(signum)
    if _State.finalizing:
        return  # bounded: recording how the run ended
    if not _State.deferred or not first or _at_safe_point(frame):
        raise interrupted()


def _fail_fast() -> None:
    """Prefect's client gives up at the first failed request from now on (a dead server is not
    retried for minutes at shutdown)."""
    if "prefect.context" not in sys.modules:  # no client yet: nothing to hurry (no import here)
        return
    try:
        from prefect.context import GLOBAL_SETTINGS_CONTEXT
        from prefect.settings import get_current_settings

        for settings in (get_current_settings(), GLOBAL_SETTINGS_CONTEXT.settings):
            settings.client.max_retries = 0
        os.environ["PREFECT_CLIENT_MAX_RETRIES"] = "0"
    except Exception:  # noqa: BLE001 - Prefect not imported or settings frozen: best effort
        pass


def _install() -> Optional[dict[int, Any]]:
    """Our handler for SIGTERM/SIGINT; the previous ones (None outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return {s: signal.signal(s, _handler) for s in STOP_SIGNALS}


def _restore(previous: Optional[dict[int, Any]]) -> None:
    if previous:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """SIGTERM/SIGINT raise :class:`Interrupted` in this block (at once, or at safe points in a
    :func:`deferred` block)."""
    previous = _install()
    try:
        yield
    finally:
        _restore(previous)


@contextlib.contextmanager
def deferred(label: str) -> Iterator[None]:
    """Inside: a stop raises only at safe points (``models/`` code, :func:`check`). Installs the
    handler too, so it works where :func:`handling` was not entered (a deployment's run)."""
    previous = _install()
    _State.deferred.append(label)
    try:
        check()
        yield
    finally:
        _State.deferred.pop()
        _restore(previous)


@contextlib.contextmanager
def finalizing() -> Iterator[None]:
    """Recording how a stopped run ended: further signals are ignored (this is bounded)."""
    before, _State.finalizing = _State.finalizing, True
    try:
        yield
    finally:
        _State.finalizing = before


__all__ = ["Interrupted", "check", "check_before", "requested", "received", "request", "reset", "handling",
           "deferred", "finalizing", "exit_code", "signal_name", "interrupted"]
