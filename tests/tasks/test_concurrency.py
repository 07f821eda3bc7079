"""``tasks.concurrency.registry_slot`` without a Prefect server: an OS file lock that excludes
other processes and is released when its holder dies. (With a server: tests/flows/test_schedule.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # `make test-fast` leaves it out: locks held by other processes

HOLD = textwrap.dedent("""
    import json, sys, time
    from tasks.concurrency import prefect_server_configured, registry_slot
    assert not prefect_server_configured()
    with registry_slot(sys.argv[1], timeout_seconds=60):
        start = time.time()
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
        end = time.time()
    print(json.dumps([start, end]), flush=True)
""")


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def _hold(tmp_path: Path, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "state"), str(seconds)],
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_file_lock_excludes_processes_in_ephemeral_mode(tmp_path):
    procs = [_hold(tmp_path, 1.0) for _ in range(2)]
    spans = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        spans.append(json.loads(out.strip().splitlines()[-1]))
    (_, end1), (start2, _) = sorted(spans)
    assert end1 <= start2, spans
    assert (tmp_path / "state" / ".infrec-registry.lock").is_file()
    assert not (tmp_path / "prefect-home" / "prefect.db").exists()  # no ephemeral server needed


def test_file_lock_is_released_when_the_holder_is_killed(tmp_path):
    holder = _hold(tmp_path, 600)
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.kill()
        holder.wait(timeout=30)
        t0 = time.monotonic()
        waiter = _hold(tmp_path, 0)
        out, err = waiter.communicate(timeout=120)
        assert waiter.returncode == 0, err[-2000:]
        assert time.monotonic() - t0 < 60
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=30)


def test_file_slot_times_out(tmp_path):
    import pytest

    from tasks.concurrency import file_slot

    lock = tmp_path / "x.lock"
    with file_slot(lock):
        holder = subprocess.run(
            [sys.executable, "-c", "import sys\nfrom tasks.concurrency import file_slot\n"
             "try:\n    with file_slot(sys.argv[1], timeout_seconds=1): pass\n"
             "except TimeoutError: sys.exit(3)\n", str(lock)],
            capture_output=True, text=True, timeout=60)
        assert holder.returncode == 3, holder.stderr
    with file_slot(lock, timeout_seconds=1):  # free again
        pass
    with pytest.raises(TimeoutError):
        with file_slot(lock):
            with file_slot(lock, timeout_seconds=0.2):  # not re-entrant
                pass
