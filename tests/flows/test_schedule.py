"""Scheduled runs against a real Prefect server (``infrec server`` = ``prefect server start``)
served by ``infrec serve`` in a subprocess; overlapping runs; the registry concurrency limit.

One module-scoped server (free loopback port, temporary PREFECT_HOME) and one ``infrec serve``
process with a small params file (300 users × 120 items, random summary of 50 users), MLflow on
SQLite and the state dir in a temporary directory. Everything is stopped terminate → wait → kill.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

MODEL = "infrec-sched-test"
DEPLOYMENT = "sched-test"
# Generous for a busy 2-core CI machine; the whole module takes ≈ 1 min on an idle one.
SERVER_TIMEOUT = 150
SERVE_TIMEOUT = 150
RUNS_TIMEOUT = 300

SMALL = {
    "generate": {"users": 300, "items": 120, "seed": 0},
    "distill": {"sampler": "random", "budget": 50, "seed": 0},
    "evaluate": {"ease_lambdas": [10.0, 100.0]},
    "gates": {"pop_margin": -100.0, "ease_fraction": 0.0, "champion_epsilon": 100.0,
              "fidelity_fraction": 0.0},
    "registry": {"model_name": MODEL, "experiment": "infrec-sched-test"},
}


from tests.helpers import free_port as _free_port  # noqa: E402
from tests.helpers import tail as _tail  # noqa: E402


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _clean_env(**extra: str) -> dict[str, str]:
    from tests.helpers import clean_env

    return clean_env(**extra)


class Server:
    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.home = root / "prefect-home"
        self.log = root / "server.log"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``infrec server --port FREE``: execs ``prefect server start --host 127.0.0.1 --no-ui``."""
    from infrec.cmd_schedule import stop_process, wait_healthy

    srv = Server(tmp_path_factory.mktemp("prefect-server"))
    srv.home.mkdir()
    # a run refused a deployment concurrency slot retries after this many seconds (default 30)
    env = _clean_env(PREFECT_HOME=str(srv.home), INFREC_STATE_DIR=str(srv.root / "state"),
                     PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="3")
    with srv.log.open("w") as log:
        proc = subprocess.Popen([_bin("infrec"), "server", "--port", str(srv.port)], env=env,
                                cwd=srv.root, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        try:
            wait_healthy(srv.url, SERVER_TIMEOUT, process=proc)
        except (TimeoutError, RuntimeError) as exc:
            pytest.fail(f"{exc}\n{_tail(srv.log)}")
        yield srv
    finally:
        stop_process(proc)


@pytest.fixture()
def api(server):
    """This process's Prefect client settings pointed at the server (over any test harness)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.url}):
        yield server


@pytest.fixture(scope="module")
def served(server):
    """``infrec serve`` in a subprocess, with a cron 12 hours away (it never fires in the test;
    runs are triggered with ``run_deployment``)."""
    from infrec.cmd_schedule import stop_process

    root = server.root / "serve"
    root.mkdir()
    hour = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=12)).hour
    cron = f"0 {hour} * * *"
    params = dict(SMALL, schedule={"cron": cron, "timezone": "UTC"}, state_dir=str(root / "state"))
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    env = _clean_env(PREFECT_API_URL=server.url, PREFECT_HOME=str(root / "client-home"),
                     PREFECT_RUNNER_POLL_FREQUENCY="2", MLFLOW_TRACKING_URI=tracking,
                     INFREC_STATE_DIR=str(root / "state"))
    log_path = root / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([_bin("infrec"), "serve", "--params", str(params_file),
                                 "--name", DEPLOYMENT], env=env, cwd=root, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    info = {"proc": proc, "log": log_path, "cron": cron, "tracking_uri": tracking, "root": root}
    try:
        yield info
    finally:
        code = stop_process(proc, grace=30)
        info["exit_code"] = code


def _wait_deployment(served, timeout: float = SERVE_TIMEOUT):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if served["proc"].poll() is not None:
                pytest.fail(f"infrec serve exited ({served['proc'].returncode}):\n"
                            f"{_tail(served['log'])}")
            try:
                return client.read_deployment_by_name(f"infrec-pipeline/{DEPLOYMENT}")
            except ObjectNotFound:
                time.sleep(1)
    pytest.fail(f"deployment not registered after {timeout}s:\n{_tail(served['log'])}")


def test_serve_registers_scheduled_deployment(api, served):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from tasks.concurrency import REGISTRY_LIMIT

    dep = _wait_deployment(served)
    assert len(dep.schedules) == 1 and dep.schedules[0].active
    assert dep.schedules[0].schedule.cron == served["cron"]
    assert dep.schedules[0].schedule.timezone == "UTC"
    # one run of the deployment at a time (the server keeps it as a global limit of its own)
    assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1
    assert dep.concurrency_options.collision_strategy.value == "ENQUEUE"
    assert dep.parameters["params"]["registry"]["model_name"] == MODEL
    assert dep.entrypoint == "flows.pipeline.pipeline"
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(REGISTRY_LIMIT)
        assert limit.limit == 1 and limit.active
        # the server's scheduler turns the cron into future runs at <hour>:00 UTC
        deadline = time.monotonic() + 60
        scheduled = []
        while time.monotonic() < deadline and not scheduled:
            scheduled = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
            scheduled = [r for r in scheduled if r.state and r.state.is_scheduled()
                         and r.auto_scheduled]
            if not scheduled:
                time.sleep(2)
    assert scheduled, "no auto-scheduled run was created from the cron schedule"
    hour = int(served["cron"].split()[1])
    for run in scheduled:
        when = run.expected_start_time.astimezone(dt.timezone.utc)
        assert (when.hour, when.minute) == (hour, 0) and when > dt.datetime.now(dt.timezone.utc)


def test_overlapping_runs_are_serialised_and_the_second_is_unchanged(api, served):
    """Two runs requested at once: both complete, one after the other; the first registers a
    version, the second (same data, clean code) recognises the champion's model and registers
    none."""
    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    _wait_deployment(served)
    t0 = time.monotonic()
    runs = [run_deployment(f"infrec-pipeline/{DEPLOYMENT}", timeout=0) for _ in range(2)]
    done = {}
    with get_client(sync_client=True) as client:
        while time.monotonic() - t0 < RUNS_TIMEOUT and len(done) < 2:
            for run in runs:
                current = client.read_flow_run(run.id)
                if current.state is not None and current.state.is_final():
                    done[run.id] = current
            if served["proc"].poll() is not None:
                pytest.fail(f"infrec serve exited:\n{_tail(served['log'])}")
            time.sleep(2)
    if len(done) < 2:
        pytest.fail(f"runs not finished after {RUNS_TIMEOUT}s:\n{_tail(served['log'])}")
    for run in done.values():
        assert run.state.is_completed(), f"{run.name}: {run.state}\n{_tail(served['log'])}"
    first, second = sorted(done.values(), key=lambda r: r.start_time)
    assert first.end_time <= second.start_time, "the deployment's runs overlapped"
    with get_client(sync_client=True) as client:  # held back by the deployment's limit
        names = [st.name for st in client.read_flow_run_states(second.id)]
    assert "AwaitingConcurrencySlot" in names, names

    client = mlflow.MlflowClient(tracking_uri=served["tracking_uri"],
                                 registry_uri=served["tracking_uri"])
    versions = client.search_model_versions(f"name='{MODEL}'")
    by_run = {mv.tags.get("prefect_flow_run_id"): mv.version for mv in versions}
    by_run = {k: str(v) for k, v in by_run.items()}
    from tasks import registry

    if registry.git_commit().endswith("+dirty"):  # uncommitted code: each run a candidate
        assert by_run == {str(first.id): "1", str(second.id): "2"}, by_run
    else:  # the second saw the champion's data, params and code: it registers nothing, and
        # its flow run says so with the `unchanged` tag
        assert by_run == {str(first.id): "1"}, by_run
        assert "unchanged" in second.tags, (first.tags, second.tags)
    assert "unchanged" not in first.tags, first.tags
    print(f"two serialised runs in {time.monotonic() - t0:.1f}s")


def test_cancelling_a_deployment_run_stops_it_in_seconds(api, served):
    """`prefect flow-run cancel` of a deployment's run while Distill-CF runs: the run's process
    stops at its next step (infrec marks the task run Cancelled itself — the runner would only
    SIGKILL it after 30 s), the flow run ends Cancelled, the writer lock and the registry slot
    are free, and the state dir records the interrupted run."""
    import fcntl

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment

    from tasks.concurrency import REGISTRY_LIMIT

    dep = _wait_deployment(served)
    params = dict(dep.parameters["params"])
    params["distill"] = {**params["distill"], "sampler": "distill-cf", "steps": 100000,
                         "min_steps": 100000, "patience": 100000, "samples": 8,
                         "eval_every": 1000}  # only a cancellation ends it
    run = run_deployment(f"infrec-pipeline/{DEPLOYMENT}", parameters={"params": params},
                         timeout=0)
    only_run = FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + RUNS_TIMEOUT
        while not any(t.name.startswith("distill") and t.state and t.state.is_running()
                      for t in client.read_task_runs(flow_run_filter=only_run)):
            assert time.monotonic() < deadline, f"distill never ran:\n{_tail(served['log'])}"
            time.sleep(1)
        time.sleep(2)  # a few steps in
        sent = time.monotonic()
        res = subprocess.run([_bin("prefect"), "flow-run", "cancel", str(run.id)],
                             env=_clean_env(PREFECT_API_URL=api.url), capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        while not (current := client.read_flow_run(run.id)).state.is_final():
            # well within the runner's 30 s grace before its SIGKILL (the CLI's start included)
            assert time.monotonic() - sent < 25, f"{current.state}\n{_tail(served['log'])}"
            time.sleep(0.5)
        print(f"`prefect flow-run cancel` to a final state: {time.monotonic() - sent:.1f}s "
              f"(the command's own start included): {current.state}")
        assert current.state.is_cancelled(), current.state
        distill = next(t for t in client.read_task_runs(flow_run_filter=only_run)
                       if t.name.startswith("distill"))
        assert distill.state.is_cancelled(), distill.state
        assert "stopped by SIGTERM during distill" in (distill.state.message or "")
        assert client.read_global_concurrency_limit_by_name(REGISTRY_LIMIT).active_slots == 0
    state = Path(params["state_dir"])
    fd = os.open(state / ".infrec-registry.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while held
    finally:
        os.close(fd)
    record = json.loads((state / "last_run.json").read_text())
    assert record["outcome"] == "interrupted" and record["flow_run_id"] == str(run.id), record


HOLD_SLOT = textwrap.dedent("""
    import json, sys, time
    from tasks.concurrency import prefect_server_configured, registry_slot
    assert prefect_server_configured()  # the server's global concurrency limit, not a file lock
    with registry_slot(sys.argv[1], timeout_seconds=120):
        start = time.time()
        time.sleep(1.5)
        end = time.time()
    print(json.dumps([start, end]))
""")


def test_registry_slot_excludes_other_processes(server, tmp_path):
    """``tasks.concurrency.registry_slot``: two processes with different state dirs (as on two
    machines: no shared file lock) never hold the server's slot at the same time."""
    env = _clean_env(PREFECT_API_URL=server.url, PREFECT_HOME=str(tmp_path / "home"))
    procs = [subprocess.Popen([sys.executable, "-c", HOLD_SLOT, str(tmp_path / f"machine{i}")],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    spans = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
        spans.append(json.loads(out.strip().splitlines()[-1]))
    (s1, e1), (s2, e2) = sorted(spans)
    assert e1 <= s2, f"slot held concurrently: {spans}"


def test_serve_stops_cleanly_and_pauses_schedule(api, served):
    """SIGTERM: the runner shuts down gracefully and pauses the deployment's schedule."""
    from prefect.client.orchestration import get_client

    from infrec.cmd_schedule import stop_process

    dep = _wait_deployment(served)
    code = stop_process(served["proc"], grace=30)
    assert code == 0, _tail(served["log"])
    with get_client(sync_client=True) as client:
        dep = client.read_deployment(dep.id)
    assert dep.paused  # no scheduled run fires while nothing serves it


def test_deploy_to_process_work_pool(api, served, tmp_path):
    """``infrec deploy``: the same deployment registered with a process work pool (for
    ``prefect worker start --pool``), the pool created on demand."""
    from prefect.client.orchestration import get_client

    params_file = served["root"] / "params.yaml"
    env = _clean_env(PREFECT_API_URL=api.url, PREFECT_HOME=str(tmp_path / "home"),
                     MLFLOW_TRACKING_URI=served["tracking_uri"])
    res = subprocess.run([_bin("infrec"), "deploy", "--params", str(params_file), "--pool",
                          "infrec-test-pool", "--name", "pooled"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "prefect worker start --pool infrec-test-pool" in res.stdout
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("infrec-pipeline/pooled")
        pool = client.read_work_pool("infrec-test-pool")
    assert pool.type == "process"
    assert dep.work_pool_name == "infrec-test-pool"
    assert dep.schedules[0].schedule.cron == served["cron"]
    assert dep.global_concurrency_limit.limit == 1


def test_bad_schedule_and_missing_api_are_one_line_errors(tmp_path, restore_environ):
    from typer.testing import CliRunner

    from infrec.cli import app

    bad = tmp_path / "bad.yaml"
    bad.write_text('schedule: {cron: "61 3 * * *", timezone: UTC}\n')
    res = CliRunner().invoke(app, ["serve", "--params", str(bad)])
    assert res.exit_code == 2 and "Invalid cron string" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    zone = tmp_path / "zone.yaml"
    zone.write_text('schedule: {cron: "0 3 * * *", timezone: Mars/Olympus}\n')
    res = CliRunner().invoke(app, ["serve", "--params", str(zone)])
    assert res.exit_code == 2 and "unknown time zone 'Mars/Olympus'" in res.stderr
    good = tmp_path / "good.yaml"
    good.write_text('schedule: {cron: "0 3 * * *", timezone: UTC}\n')
    os.environ.pop("PREFECT_API_URL", None)
    res = CliRunner().invoke(app, ["deploy", "--params", str(good)])
    assert res.exit_code == 2 and "set PREFECT_API_URL" in res.stderr


@pytest.mark.parametrize("args, says", [
    (["serve", "--name", "a/b"], "--name 'a/b': a Prefect name"),
    (["serve", "--server-port", "0"], "--server-port 0: a TCP port is 1–65535"),
    (["serve", "--startup-timeout", "0"], "--startup-timeout 0.0: seconds"),
    (["serve", "--input", "missing.csv"], "missing.csv: input file not found"),
    (["serve", "--input", "quote.csv"], "line 3: unclosed quote"),
    (["deploy", "--pool", "x%y"], "--pool 'x%y': a Prefect name"),
    (["deploy", "--input", "quote.csv"], "line 3: unclosed quote"),
    (["serve", "--params", "cron.yaml", "--input", "good.csv"], "Invalid cron string"),
])
def test_serve_and_deploy_check_every_argument_before_anything(tmp_path, monkeypatch,
                                                                restore_environ, args, says):
    """`infrec serve` / `infrec deploy` with a bad argument, input file or schedule: one line,
    exit 2, before a server starts or anything is contacted — params.yaml (which `--input`
    would update) and the folder are as they were. (Measured, not asserted: ≈ 1 s idle.)"""
    from typer.testing import CliRunner

    from infrec.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing answers there
    (tmp_path / "params.yaml").write_text("versioning: {enabled: false}\n")
    (tmp_path / "cron.yaml").write_text('schedule: {cron: "61 3 * * *", timezone: UTC}\n'
                                        "versioning: {enabled: false}\n")
    (tmp_path / "quote.csv").write_text('userId,movieId\n1,2\n3,"4\n5,6\n')
    (tmp_path / "good.csv").write_text("userId,movieId\n1,2\n1,3\n1,4\n")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and says in res.stderr, (res.exit_code, res.stderr, res.stdout)
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
