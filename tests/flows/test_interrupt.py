"""Stop means stop: SIGTERM and SIGINT to the process group of `infrec run` while Distill-CF runs
(as a scheduler, `timeout` or Ctrl-C send them), in a real git + DVC workspace with MLflow on
SQLite and real Prefect servers.

One workspace for both signals: a first run makes v1; then params with a Distill-CF that never
ends by itself and two interrupted runs — SIGTERM with the temporary server `infrec run` starts
by itself (it must outlive the group's signal to record the end), SIGINT with an `infrec server`
(whose registry slot must be released) — then the params back for a run that completes. After
each signal: the process is gone within 10 s (a bounded wait: the test fails if it is still
alive), exit code 143 / 130 and one line naming what was interrupted, the flow run and its
distill task run `Cancelled`/`Crashed` in the Prefect database (read from its file, as a
restarted server reads it), nothing `Running` there or in MLflow, the writer lock and the
registry slot free, no process left, `git status` and `dvc status` as before the run; then
`infrec status` names the interrupted run. Each run's seconds from signal to exit are printed.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import BIN, make_workspace, prefect_server, tail, write_log

pytestmark = pytest.mark.slow

# a Distill-CF that only a signal ends (small data: a step is a fraction of a second)
ENDLESS_DISTILL = {"sampler": "distill-cf", "budget": 60, "steps": 100000, "min_steps": 100000,
                   "patience": 100000, "samples": 8, "eval_every": 1000}
EXIT_WITHIN = 10.0
FINAL = ("CANCELLED", "CRASHED")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A workspace whose first run (v1) completed, with an `infrec server` (``ws.server``)."""
    root = tmp_path_factory.mktemp("interrupt")
    log = write_log(root / "logs" / "ratings.csv", users=300)
    with prefect_server(root / "server") as url:
        ws = make_workspace(root, url, ingest={"input": str(log)})
        ws.infrec("run")
        ws.log, ws.server, ws.after_v1 = log, url, _status(ws)
        yield ws


def _status(ws) -> tuple[str, dict]:
    """`git status --porcelain` and what `dvc status` reports (DVC's API: no CLI start-up)."""
    from dvc.repo import Repo

    with Repo(str(ws.root)) as repo:  # stage names relative to the cwd: keep the name only
        dvc = {stage.rsplit(":", 1)[-1]: what for stage, what in repo.status().items()}
    return ws.git("status", "--porcelain"), dvc


def _last_flow_run(db: Path) -> tuple[str, dict[str, str], list[str]]:
    """The last `infrec-pipeline` flow run's state, its task runs' states and messages."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        run_id, state = con.execute(
            "SELECT fr.id, fr.state_type FROM flow_run fr JOIN flow f ON f.id = fr.flow_id "
            "WHERE f.name = 'infrec-pipeline' ORDER BY fr.created DESC LIMIT 1").fetchone()
        tasks = con.execute("SELECT tr.name, tr.state_type, s.message FROM task_run tr "
                            "LEFT JOIN task_run_state s ON s.id = tr.state_id "
                            "WHERE tr.flow_run_id = ?", (run_id,)).fetchall()
    return state, {name.split("-")[0]: st for name, st, _ in tasks}, [m or "" for *_, m in tasks]


def _lock_free(state_dir: Path) -> bool:
    fd = os.open(state_dir / ".infrec-registry.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _processes_in(root: Path) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if int(pid) != os.getpid() and (cwd == str(root) or cwd.startswith(f"{root}{os.sep}")):
            found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120])
    return found


def _interrupt_mid_distill(ws, signum: int, temporary_server: bool) -> None:
    ws.api_url = None if temporary_server else ws.server
    ws.write_params(ingest={"input": str(ws.log)}, distill=ENDLESS_DISTILL)
    if not hasattr(ws, "before_interrupt"):  # the same before both signals: measured once
        ws.before_interrupt = _status(ws)
    before = ws.before_interrupt
    out = ws.root.parent / f"run-{signum}.log"
    steps = ws.root / ".infrec" / "data" / "distill_log.jsonl"
    steps.unlink(missing_ok=True)  # the last run's
    with out.open("w") as fh:
        proc = subprocess.Popen([str(BIN / "infrec"), "run"], cwd=ws.root, env=ws.env(),
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (steps.is_file() and len(steps.read_text().splitlines()) >= 2):  # step 1 done
            assert proc.poll() is None, f"ended before distill ({proc.returncode}):\n{tail(out)}"
            assert time.monotonic() < deadline, f"distill not started:\n{tail(out)}"
            time.sleep(0.2)
        sent = time.monotonic()
        os.killpg(proc.pid, signum)
        try:
            code = proc.wait(timeout=EXIT_WITHIN)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {EXIT_WITHIN:g}s after {signal.Signals(signum).name}:\n"
                        f"{tail(out)}")
        print(f"{signal.Signals(signum).name}: exit {code} after {time.monotonic() - sent:.2f}s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 128 + signum, tail(out)
    last = out.read_text().strip().splitlines()[-1]
    assert last.startswith(f"error: interrupted: infrec run stopped by "
                           f"{signal.Signals(signum).name} during distill; nothing was promoted"), last
    db = (ws.root / ".infrec" / "prefect" if temporary_server
          else ws.root.parent / "server" / "prefect-home") / "prefect.db"
    flow, tasks, messages = _last_flow_run(db)
    assert flow in FINAL and tasks.get("distill") in FINAL, (flow, tasks, tail(out))
    assert "RUNNING" not in tasks.values(), tasks
    assert any(f"stopped by {signal.Signals(signum).name} during distill" in m
               for m in messages), messages
    assert _lock_free(ws.root / ".infrec")
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:  # the server's slot, if used
        assert not con.execute("SELECT active_slots FROM concurrency_limit_v2 WHERE "
                               "name = 'infrec-registry' AND active_slots > 0").fetchall()
    assert not ws.client().search_runs(
        [e.experiment_id for e in ws.client().search_experiments()], "attributes.status = 'RUNNING'")
    assert not _processes_in(ws.root)  # the temporary server was stopped, not orphaned
    assert _status(ws) == before


def test_sigterm_mid_distill_stops_in_seconds_and_records_cancelled(workspace):
    _interrupt_mid_distill(workspace, signal.SIGTERM, temporary_server=True)


def test_sigint_mid_distill_stops_in_seconds_and_records_cancelled(workspace, monkeypatch,
                                                                 restore_environ):
    from typer.testing import CliRunner

    from infrec.cli import app

    _interrupt_mid_distill(workspace, signal.SIGINT, temporary_server=False)
    monkeypatch.chdir(workspace.root)  # `infrec status` as the user types it there
    monkeypatch.setenv("PREFECT_API_URL", workspace.server)
    status = CliRunner().invoke(app, ["status"])
    assert status.exit_code == 0, status.output
    line = next(ln for ln in status.stdout.splitlines() if ln.startswith("last run:"))
    assert "interrupted" in line and "stopped by SIGINT during distill" in line, status.stdout


def test_after_an_interruption_the_next_run_completes(workspace):
    workspace.git("checkout", "params.yaml")
    workspace.api_url = workspace.server
    run = workspace.infrec("run")
    assert "unchanged" in run.stdout or "registered" in run.stdout, run.stdout[-2000:]
    assert _status(workspace) == workspace.after_v1


def test_a_stopped_run_ends_the_mlflow_runs_it_left_open_killed(workspace, monkeypatch):
    """What an interrupted process left RUNNING in MLflow (stopped while logging its model)
    ends KILLED before it exits; another live process's run is left alone (in the workspace's
    own registry)."""
    from tasks import registry
    from tasks.params import load_params
    from tasks.recovery import close_own_records
    from tasks.runtime import process_tags

    monkeypatch.setenv("MLFLOW_TRACKING_URI", workspace.tracking_uri)
    p = load_params(workspace.root / "params.yaml")
    cl = registry.client(workspace.tracking_uri)
    exp = cl.get_experiment_by_name(p.registry.experiment).experiment_id
    ours = cl.create_run(exp, tags=process_tags()).info.run_id
    other = cl.create_run(exp, tags={**process_tags(), "infrec.pid": str(os.getppid())})
    assert close_own_records(p)["mlflow_runs_killed"] == [ours]
    assert cl.get_run(ours).info.status == "KILLED"
    assert cl.get_run(other.info.run_id).info.status == "RUNNING"
    cl.set_terminated(other.info.run_id)
