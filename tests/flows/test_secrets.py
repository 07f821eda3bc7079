"""Secrets stay out: `infrec run` against a real MLflow tracking server whose URI carries a token
(``http://user:TOKEN@127.0.0.1:port``, the form HTTP basic auth takes in MLFLOW_TRACKING_URI),
with the temporary Prefect server `infrec run` starts by itself, in a real git + DVC workspace.

The token must reach no file anything writes — MLflow's database and artifacts (params, tags,
logged models, reports), Prefect's database (flow-run parameters, logs, artifacts), DVC and git
metadata, infrec's state — and neither the run's output nor `infrec status`."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import BIN, clean_env, free_port, make_workspace, tail, write_log

pytestmark = pytest.mark.slow
TOKEN = "S3cr3tT0kenXYZ"


def _files_containing(root: Path, needle: bytes) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if needle in path.read_bytes():
                    found.append(str(path.relative_to(root)))
            except OSError:
                pass
    return found


def test_a_token_in_the_tracking_uri_is_written_nowhere(tmp_path):
    from infrec.common import stop_process, wait_healthy

    server_dir = tmp_path / "mlflow-server"
    server_dir.mkdir()
    port = free_port()
    log_path = tmp_path / "mlflow-server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [str(BIN / "infrec"), "mlflow-server", "--port", str(port)], cwd=server_dir,
            env=clean_env(INFREC_STATE_DIR=str(server_dir / "state")), stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        try:
            wait_healthy(f"http://127.0.0.1:{port}", 180, process=server)
        except (TimeoutError, RuntimeError) as exc:
            pytest.fail(f"{exc}\n{tail(log_path)}")
        uri = f"http://bob:{TOKEN}@127.0.0.1:{port}"
        data = write_log(tmp_path / "logs" / "ratings.csv", users=300)
        ws = make_workspace(tmp_path, None, ingest={"input": str(data)})
        env = ws.env(MLFLOW_TRACKING_URI=uri)
        run = ws.infrec("run", env=env)
        status = ws.infrec("status", env=env)
        for name, text in (("run stdout", run.stdout), ("run stderr", run.stderr),
                           ("status", status.stdout + status.stderr)):
            assert TOKEN not in text, name
        assert "registered: infrec-infae version 1" in run.stdout, run.stdout[-2000:]
        assert "***@127.0.0.1" in status.stdout, status.stdout  # shown, redacted

        import mlflow

        plain = f"http://127.0.0.1:{port}"  # the server does not check credentials
        client = mlflow.MlflowClient(tracking_uri=plain, registry_uri=plain)
        champion = client.get_model_version_by_alias("infrec-infae", "champion")
        logged = client.get_run(champion.run_id)
        for k, v in [*logged.data.params.items(), *logged.data.tags.items(),
                     *champion.tags.items()]:
            assert TOKEN not in f"{k}={v}", k
        time.sleep(1)  # the servers' last writes
    finally:
        stop_process(server)
    # everything written: the workspace (git, DVC cache and remote, .infrec with the temporary
    # Prefect server's database and MLflow-side files), the tracking server's DB and artifacts
    assert (server_dir / "mlflow.db").is_file() and any((server_dir / "state").rglob("MLmodel"))
    assert any(ws.root.rglob("*.db")), "no Prefect database found in the workspace"
    assert _files_containing(tmp_path / "ws", TOKEN.encode()) == []
    assert _files_containing(tmp_path / "dvc-remote", TOKEN.encode()) == []
    assert _files_containing(server_dir, TOKEN.encode()) == []
