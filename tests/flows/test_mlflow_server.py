"""``infrec mlflow-server``: a real MLflow tracking server on loopback (SQLite backend, proxied
artifacts under the state dir), used through the project's registry helpers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_mlflow_server_command_line(tmp_path):
    from infrec.cmd_scale import mlflow_server_command

    cmd = mlflow_server_command(5001, "sqlite:////x/mlflow.db",
                                artifacts_destination="s3://bucket/mlflow")
    assert cmd[1:] == ["server", "--host", "127.0.0.1", "--port", "5001", "--backend-store-uri",
                       "sqlite:////x/mlflow.db", "--workers", "1", "--artifacts-destination",
                       "s3://bucket/mlflow"]
    direct = mlflow_server_command(5001, "postgresql://u@db/mlflow", default_artifact_root="/a")
    assert "--default-artifact-root" in direct and "--artifacts-destination" not in direct


def test_mlflow_server_tracks_and_proxies_artifacts(tmp_path):
    import mlflow

    from infrec.cmd_schedule import stop_process
    from tasks import registry

    port = _free_port()
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "INFREC_"))}
    env.update(INFREC_STATE_DIR=str(state), MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    log_path = tmp_path / "mlflow-server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "infrec"), "mlflow-server",
                                 "--port", str(port)], env=env, cwd=tmp_path, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"MLflow server not healthy:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        assert (tmp_path / "mlflow.db").is_file()  # the pipeline's default: the workspace's DB

        # the project's helper: a remote tracking URI gets the server's artifact location
        exp_id = registry.configure(url, "infrec-server-test", artifact_root=tmp_path / "unused")
        client = mlflow.MlflowClient(tracking_uri=url, registry_uri=url)
        assert client.get_experiment(exp_id).artifact_location.startswith("mlflow-artifacts:")
        note = tmp_path / "note.txt"
        note.write_text("hello")
        run = client.create_run(exp_id)
        client.log_metric(run.info.run_id, "val/ndcg_at_10", 12.5)
        client.log_artifact(run.info.run_id, str(note), "notes")
        client.set_terminated(run.info.run_id)
        stored = list((state / "mlartifacts").rglob("note.txt"))
        assert len(stored) == 1 and stored[0].read_text() == "hello"
        assert client.get_run(run.info.run_id).data.metrics["val/ndcg_at_10"] == 12.5
        assert not (tmp_path / "unused").exists()
    finally:
        stop_process(proc)
