"""Mutual exclusion of pipeline runs' shared stages across processes and machines.

Two pipeline runs may overlap (a scheduled run and a manual ``infrec run``, two deployments, a late
run enqueued behind a slow one). They share fixed paths under ``state_dir`` (the processed data
and summary that the DVC version stage commits), the DVC workspace and the registry aliases, so
their stages must not interleave. They run inside::

    from tasks.concurrency import registry_slot

    with registry_slot(params.state_dir):
        ...  # ingest → distill → version → fit → evaluate → register → promote

With a Prefect server (``PREFECT_API_URL``, a profile, or the test harness) ``registry_slot``
holds the one slot of the global concurrency limit ``infrec-registry``, created on demand
(``prefect.concurrency.sync.concurrency``, ``strict=True``: a missing limit is an error, never a
silent no-op). The slot is leased: a run that dies frees it when its lease expires
(``lease_duration``, renewed while the run is alive; the server's repossessor reclaims it) —
measured: a SIGKILLed holder's slot passed to the next run ≈ 75 s after the kill with a 60 s lease.

In Prefect's ephemeral mode (no server configured: ``infrec run`` on its own) there is no server
that outlives the run, so a killed holder's lease would never expire (measured: the slot stays
taken). There the lock is an exclusive ``flock`` on ``<lock_dir>/.infrec-registry.lock`` instead,
which the OS releases when the process dies; runs sharing a state dir on one machine exclude each
other.

Neither is re-entrant: do not nest two ``registry_slot()`` blocks in one run (the inner one would
wait for the outer one forever). Scheduled runs of *one* deployment are also serialised as a
whole by the deployment's own ``concurrency_limit=1`` (``infrec serve``/``infrec deploy``).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Iterator, Optional

REGISTRY_LIMIT = "infrec-registry"


def ensure_limit(name: str = REGISTRY_LIMIT, limit: int = 1) -> None:
    """Create the global concurrency limit ``name`` with ``limit`` slots, or set an existing one
    to ``limit`` slots and active. Safe when two processes race to create it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            existing = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=limit, active=True))
                return
            except ObjectAlreadyExists:  # another process created it first
                existing = client.read_global_concurrency_limit_by_name(name)
        if existing.limit != limit or not existing.active:
            client.update_global_concurrency_limit(
                name, GlobalConcurrencyLimitUpdate(limit=limit, active=True))


def prefect_server_configured() -> bool:
    """True when Prefect talks to a server (not its ephemeral, per-process one)."""
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


@contextlib.contextmanager
def file_slot(path: str | Path, timeout_seconds: Optional[float] = None,
              poll_seconds: float = 0.5) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing) for the duration of the block;
    released by the OS if the process dies. ``TimeoutError`` after ``timeout_seconds``."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"{path}: lock not acquired after {timeout_seconds}s")
                time.sleep(poll_seconds)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _say(message: str) -> None:
    try:
        from prefect.logging import get_run_logger

        get_run_logger().info(message)
    except Exception:  # noqa: BLE001 - outside a run: nothing to log to
        pass


@contextlib.contextmanager
def registry_slot(lock_dir: str | Path | None = None, name: str = REGISTRY_LIMIT,
                  timeout_seconds: Optional[float] = None,
                  lease_duration: float = 300) -> Iterator[None]:
    """Hold the pipeline's exclusive slot for the duration of the block (see the module doc).

    ``lock_dir``: where the ephemeral-mode lock file lives (the state dir); required in
    ephemeral mode. ``timeout_seconds``: give up waiting with ``TimeoutError`` (None: wait as
    long as it takes). Call it from sync flow code.
    """
    if prefect_server_configured():
        from prefect.concurrency.sync import concurrency

        ensure_limit(name, 1)
        _say(f"waiting for the {name!r} concurrency slot")
        # a lease renewal that fails (server briefly away) only logs a warning: stopping a run
        # half-way through registering or promoting is worse
        with concurrency(name, occupy=1, timeout_seconds=timeout_seconds,
                         lease_duration=lease_duration, strict=True,
                         raise_on_lease_renewal_failure=False):
            _say(f"holding the {name!r} concurrency slot")
            yield
        return
    if lock_dir is None:
        raise ValueError("registry_slot: no Prefect server configured and no lock_dir given")
    path = Path(lock_dir) / f".{name}.lock"
    _say(f"ephemeral Prefect: waiting for the file lock {path}")
    with file_slot(path, timeout_seconds):
        _say(f"holding the file lock {path}")
        yield


__all__ = ["REGISTRY_LIMIT", "ensure_limit", "file_slot", "prefect_server_configured",
           "registry_slot"]
