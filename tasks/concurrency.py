"""Mutual exclusion of pipeline runs' shared stages across processes and machines.

Two pipeline runs may overlap (a scheduled run and a manual ``infrec run``, two deployments, a late
run enqueued behind a slow one). They share fixed paths under ``state_dir`` (the processed data
and summary that the DVC version stage commits), the DVC workspace and the registry aliases, so
their stages must not interleave. They run inside::

    from tasks.concurrency import writer_lock

    with writer_lock(params):
        ...  # ingest → distill → fit → evaluate → version → register → promote

``infrec rollback`` and ``infrec promote`` take the same lock.

With a Prefect server (``PREFECT_API_URL``, a profile, or the test harness) ``registry_slot``
holds the one slot of the global concurrency limit ``infrec-registry``, created on demand
(``prefect.concurrency.sync.concurrency``, ``strict=True``: a missing limit is an error, never a
silent no-op). The slot is leased: a run that dies frees it when its lease expires
(``lease_duration``, 60 s — the server's minimum — renewed while the run is alive; the server's
repossessor reclaims it): measured, a SIGKILLed holder's slot passed to the next run ≈ 75 s after
the kill. On the holder's own machine that wait is cut short: every writer first takes an OS
file lock in the state dir (released by the kernel when its holder dies) and records its lease;
the next writer finds the holder dead and releases its lease at once.

Without a server that outlives the run (``infrec run`` on its own starts a temporary one that
dies with it) a lease could never expire; there the lock is the file lock alone
(``<state_dir>/.infrec-registry.lock``): runs sharing a state dir on one machine exclude each
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


TEMPORARY_SERVER_ENV = "INFREC_PREFECT_TEMPORARY_SERVER"


def prefect_server_configured() -> bool:
    """True when Prefect talks to a server that outlives this run — not its ephemeral one, and
    not the temporary server ``infrec run`` starts for itself (``INFREC_PREFECT_TEMPORARY_SERVER``):
    a lease held on a server that dies with its holder would never be released."""
    if os.environ.get(TEMPORARY_SERVER_ENV):
        return False
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
                from tasks import stop

                stop.check()  # told to stop while waiting: stop waiting
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


def _holder_file(lock_dir: Path, name: str) -> Path:
    return lock_dir / f".{name}.holder.json"


def _release_dead_holder(holder_file: Path) -> None:
    """A holder on this host whose process is gone: release its lease now instead of waiting
    for the server to expire it (≥ 60 s)."""
    import json
    from uuid import UUID

    from prefect.concurrency._sync import release_concurrency_slots_with_lease

    from tasks.runtime import HOST

    try:
        holder = json.loads(holder_file.read_text())
    except (OSError, ValueError):
        return
    if holder.get("host") != HOST:
        return
    try:
        os.kill(int(holder["pid"]), 0)
        return  # alive (it cannot be: we hold the file lock — a pid reused by another process)
    except ProcessLookupError:
        pass
    except (PermissionError, KeyError, ValueError):
        return
    try:
        release_concurrency_slots_with_lease(UUID(holder["lease_id"]))
        _say(f"released the slot of a killed writer (pid {holder['pid']})")
    except Exception:  # noqa: BLE001 - already expired or repossessed
        pass
    holder_file.unlink(missing_ok=True)


@contextlib.contextmanager
def _server_slot(name: str, lock_dir: Optional[Path], timeout_seconds: Optional[float],
                 lease_duration: float) -> Iterator[None]:
    import json

    from prefect.concurrency._leases import maintain_concurrency_lease
    from prefect.concurrency._sync import (acquire_concurrency_slots_with_lease,
                                           release_concurrency_slots_with_lease)

    from tasks.runtime import HOST

    ensure_limit(name, 1)
    holder_file = _holder_file(lock_dir, name) if lock_dir is not None else None
    if holder_file is not None:
        _release_dead_holder(holder_file)
    _say(f"waiting for the {name!r} concurrency slot")
    response = acquire_concurrency_slots_with_lease(
        [name], 1, timeout_seconds=timeout_seconds, lease_duration=lease_duration, strict=True)
    try:
        if holder_file is not None:
            holder_file.write_text(json.dumps({"pid": os.getpid(), "host": HOST,
                                               "lease_id": str(response.lease_id)}))
        # a lease renewal that fails (server briefly away) only logs a warning: stopping a run
        # half-way through registering or promoting is worse
        with maintain_concurrency_lease(response.lease_id, lease_duration,
                                        raise_on_lease_renewal_failure=False):
            _say(f"holding the {name!r} concurrency slot")
            yield
    finally:
        release_concurrency_slots_with_lease(response.lease_id)
        if holder_file is not None:
            holder_file.unlink(missing_ok=True)


@contextlib.contextmanager
def registry_slot(lock_dir: str | Path | None = None, name: str = REGISTRY_LIMIT,
                  timeout_seconds: Optional[float] = None,
                  lease_duration: float = 60) -> Iterator[None]:
    """Hold the pipeline's exclusive slot for the duration of the block (see the module doc).

    ``lock_dir``: the state dir, where the file lock lives (always taken first: the OS releases
    it the moment a holder dies, and with it a local holder's lease is released at once).
    ``timeout_seconds``: give up waiting with ``TimeoutError`` (None: wait as long as it
    takes). Not re-entrant. Call it from sync code.
    """
    if lock_dir is None:
        if not prefect_server_configured():
            raise ValueError("registry_slot: no Prefect server configured and no lock_dir given")
        with _server_slot(name, None, timeout_seconds, lease_duration):
            yield
        return
    lock_dir = Path(lock_dir)
    path = lock_dir / f".{name}.lock"
    _say(f"waiting for the file lock {path}")
    start = time.monotonic()
    with file_slot(path, timeout_seconds):
        _say(f"holding the file lock {path}")
        if not prefect_server_configured():
            yield
            return
        left = None if timeout_seconds is None else max(
            1.0, timeout_seconds - (time.monotonic() - start))
        with _server_slot(name, lock_dir, left, lease_duration):
            yield


def writer_lock(params, timeout_seconds: Optional[float] = None):
    """The one lock of every writer of a state dir — ``run``, ``rollback``, ``promote`` and
    scheduled runs: :func:`registry_slot` on ``params``' state dir."""
    return registry_slot(params.state_path(), timeout_seconds=timeout_seconds)


__all__ = ["REGISTRY_LIMIT", "writer_lock", "ensure_limit", "file_slot", "prefect_server_configured",
           "registry_slot"]
