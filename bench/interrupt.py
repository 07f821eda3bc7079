"""How `infrec run` ends when it is told to stop: SIGTERM (or SIGINT) to its process group while
Distill-CF runs, as a scheduler, `timeout` or Ctrl-C sends it, in a temporary git + DVC workspace
with the shipped params.yaml (its own state dir, MLflow database, temporary Prefect server).

    .venv/bin/python -m bench.interrupt --input ../shared/data/ml-1m/interactions.parquet

Progress goes to stderr; the last stdout line is one JSON object: the seconds from the signal to
the exit, the exit code, the last line the command printed, the flow run's and its task runs'
states in the Prefect database (read from its SQLite file, as the UI would after a restart),
MLflow runs left RUNNING, whether the writer lock is free and processes left running.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.pipeline import REPO, _env, workspace

SIGNALS = {"TERM": signal.SIGTERM, "INT": signal.SIGINT}


def prefect_states(db: Path) -> dict:
    """The last flow run of ``infrec-pipeline`` and its task runs: ``{flow: state, tasks: {name:
    state}}`` (state type and name), straight from the server's SQLite database."""
    if not db.is_file():
        return {"flow": None, "tasks": {}}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        row = con.execute("SELECT fr.id, fr.state_type, fr.state_name, fr.end_time FROM flow_run fr "
                          "JOIN flow f ON f.id = fr.flow_id WHERE f.name = 'infrec-pipeline' "
                          "ORDER BY fr.created DESC LIMIT 1").fetchone()
        if row is None:
            return {"flow": None, "tasks": {}}
        tasks = con.execute("SELECT name, state_type, state_name FROM task_run WHERE flow_run_id = ?"
                            " ORDER BY created", (row[0],)).fetchall()
    return {"flow": f"{row[1]} ({row[2]})", "flow_end_time": row[3],
            "tasks": {name: f"{t} ({n})" for name, t, n in tasks}}


def lock_free(state: Path) -> bool:
    import fcntl

    path = state / ".infrec-registry.lock"
    if not path.exists():
        return True
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def processes_in(root: Path) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
        except OSError:
            continue
        if cwd == str(root) or cwd.startswith(str(root) + os.sep):
            found.append(f"{pid}: {cmd}")
    return found


def running_mlflow_runs(db: Path) -> int:
    if not db.is_file():
        return 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        return con.execute("SELECT count(*) FROM runs WHERE status = 'RUNNING'").fetchone()[0]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True, type=Path, help="interactions file")
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--signal", choices=sorted(SIGNALS), default="TERM")
    ap.add_argument("--steps", type=int, default=2,
                    help="signal after this many Distill-CF steps are logged")
    ap.add_argument("--limit", type=float, default=300.0,
                    help="seconds to wait for the exit before SIGKILL")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="infrec-bench-interrupt-"))
    ws = workspace(root, args.params)
    before = subprocess.run(["git", "status", "--porcelain"], cwd=ws, capture_output=True,
                            text=True).stdout
    err_path = root / "run.err"
    with err_path.open("w") as err:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "infrec"), "run", "--input",
                                 str(args.input.resolve())], cwd=ws, env=_env(),
                                stdout=err, stderr=subprocess.STDOUT, start_new_session=True)
    steps_log = ws / ".infrec" / "data" / "distill_log.jsonl"
    t_start = time.monotonic()
    while proc.poll() is None:
        if steps_log.is_file() and len(steps_log.read_text().splitlines()) >= args.steps:
            break
        time.sleep(0.2)
    if proc.poll() is not None:
        raise SystemExit(f"infrec run ended before distill ({proc.returncode}):\n"
                         + err_path.read_text()[-3000:])
    print(f"mid-distill after {time.monotonic() - t_start:.1f}s: SIG{args.signal} to the group",
          file=sys.stderr)
    t_signal = time.monotonic()
    os.killpg(proc.pid, SIGNALS[args.signal])
    try:
        code = proc.wait(timeout=args.limit)
        seconds = round(time.monotonic() - t_signal, 2)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        code, seconds = proc.wait(), None
    time.sleep(1)
    state = ws / ".infrec"
    after = subprocess.run(["git", "status", "--porcelain"], cwd=ws, capture_output=True,
                           text=True).stdout
    lines = [ln for ln in err_path.read_text(errors="replace").splitlines() if ln.strip()]
    result = {"signal": f"SIG{args.signal}", "seconds_to_exit": seconds, "exit_code": code,
              "last_line": lines[-1] if lines else "",
              "prefect": prefect_states(state / "prefect" / "prefect.db"),
              "mlflow_running": running_mlflow_runs(ws / "mlflow.db"),
              "lock_free": lock_free(state), "processes_left": processes_in(ws),
              "git_status_unchanged": before == after, "workspace": str(ws),
              "loadavg": os.getloadavg()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
