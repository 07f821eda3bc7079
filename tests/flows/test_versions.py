"""Issue 5: DVC data versions and rollback of data + champion, in a temporary git repository with a
real DVC local remote, real Prefect (test harness) and real MLflow on SQLite."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "infrec-infae"
# the project's params.yaml (every key dvc.yaml lists) with small, fast, lenient settings
OVERRIDES = {
    "state_dir": ".infrec",
    "generate": {"users": 300, "items": 120, "seed": 0},
    "ingest": {"seed": 0},
    "distill": {"sampler": "random", "budget": 60, "seed": 0, "steps": 0, "samples": 8},
    "fit": {"summary_lambdas": [0.1, 1.0, 5.0, 50.0]},
    "evaluate": {"ease_lambdas": [10.0, 100.0]},
    "gates": {"pop_margin": -100.0, "ease_fraction": 0.0, "champion_epsilon": 100.0,
              "fidelity_fraction": 0.0},
    "registry": {"model_name": MODEL_NAME, "experiment": "infrec-versions-test"},
    "versioning": {"enabled": True, "workspace": "."},
}


def ws_params() -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in OVERRIDES.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return raw


def sh(cwd: Path, *args: str, env: dict | None = None) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"{args}: {proc.stderr[-2000:]}"
    return proc.stdout + proc.stderr


def make_workspace(root: Path, remote: Path) -> Path:
    """A git + DVC workspace holding the project's dvc.yaml, code (stage deps) and small params."""
    ws = root / "ws"
    ws.mkdir()
    for name in ("models", "tasks"):
        shutil.copytree(REPO / name, ws / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", ws / "dvc.yaml")
    (ws / "params.yaml").write_text(yaml.safe_dump(ws_params()))
    (ws / ".gitignore").write_text(".infrec/\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    sh(ws, "git", "init", "-q", "-b", "main")
    sh(ws, sys.executable, "-m", "dvc", "init", "-q")
    sh(ws, sys.executable, "-m", "dvc", "remote", "add", "-d", "store", str(remote))
    sh(ws, "git", "add", "-A")
    sh(ws, *git, "commit", "-qm", "workspace")
    return ws


def set_generate_seed(ws: Path, seed: int) -> None:
    raw = yaml.safe_load((ws / "params.yaml").read_text())
    raw["generate"]["seed"] = seed
    (ws / "params.yaml").write_text(yaml.safe_dump(raw))


def snapshot(ws: Path) -> dict[str, bytes]:
    files = sorted((ws / ".infrec/data/processed").iterdir()) + [ws / ".infrec/data/summary.parquet"]
    return {f.name: f.read_bytes() for f in files}


def run_in(ws: Path, monkeypatch) -> dict:
    from flows.pipeline import run_pipeline
    from infrec.config import load_params

    monkeypatch.chdir(ws)
    monkeypatch.setenv("INFREC_STATE_DIR", str(ws / ".infrec"))
    return run_pipeline(load_params(ws / "params.yaml").resolved())


def champion(tracking_uri: str) -> str:
    from mlflow import MlflowClient

    return str(MlflowClient(tracking_uri).get_model_version_by_alias(MODEL_NAME, "champion").version)


@pytest.mark.slow
def test_versions_rollback_fresh_clone_and_failed_rollback(flow_env, tmp_path, monkeypatch):
    from tasks.rollback import lineage, rollback, versions_table
    from tasks.versioning import VersioningError

    remote = tmp_path / "remote"
    ws = make_workspace(tmp_path, remote)
    head = sh(ws, "git", "rev-parse", "HEAD")
    uri = flow_env.tracking_uri

    first = run_in(ws, monkeypatch)
    assert first["data_version"] == "v1" and first["promoted"]
    v1_files, v1_model = snapshot(ws), first["version"]
    set_generate_seed(ws, 1)
    second = run_in(ws, monkeypatch)
    assert second["data_version"] == "v2" and second["promoted"]
    v2_files, v2_model = snapshot(ws), second["version"]
    assert v1_files != v2_files and champion(uri) == v2_model
    # versions were recorded without moving the working branch
    assert sh(ws, "git", "rev-parse", "HEAD") == head

    table = versions_table(ws, uri, MODEL_NAME)
    assert [r["version"] for r in table] == ["v1", "v2"]
    assert [m["version"] for m in table[0]["model_versions"]] == [v1_model]
    assert table[1]["champion"] and not table[0]["champion"]
    assert lineage(uri, f"models:/{MODEL_NAME}@champion")["data_version"] == "v2"
    tags = lineage(uri, f"models:/{MODEL_NAME}/{v1_model}")["tags"]
    for key in ("dvc_data_version", "dvc_hashes", "git_commit", "params_hash", "prefect_flow_run_id"):
        assert tags.get(key), key

    # rollback v1: data byte-identical to v1's, champion is v1's model
    event = rollback(ws, "v1", uri, MODEL_NAME, ws / ".infrec")
    assert event["champion"] == v1_model and event["from_champion"] == v2_model
    assert snapshot(ws) == v1_files and champion(uri) == v1_model
    assert json.loads((ws / ".infrec" / "version_log.jsonl").read_text().splitlines()[-1])["data_version"] == "v1"

    # a rollback that fails midway (remote unreachable, cache gone) changes nothing
    shutil.rmtree(ws / ".dvc" / "cache")
    moved = tmp_path / "remote-offline"
    remote.rename(moved)
    before = snapshot(ws), (ws / "dvc.lock").read_text()
    with pytest.raises(VersioningError):
        rollback(ws, "v2", uri, MODEL_NAME, ws / ".infrec")
    assert (snapshot(ws), (ws / "dvc.lock").read_text()) == before and champion(uri) == v1_model
    moved.rename(remote)

    # a fresh clone with no DVC cache restores v2 from the remote alone
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(ws), str(clone))
    assert not (clone / ".dvc" / "cache").exists()
    event = rollback(clone, "v2", uri, MODEL_NAME, clone / ".infrec")
    assert snapshot(clone) == v2_files and champion(uri) == v2_model

    # no model version left for v1 (deleted): rollback refits on the restored data and registers
    from mlflow import MlflowClient

    MlflowClient(uri).delete_model_version(MODEL_NAME, v1_model)
    event = rollback(ws, "v1", uri, MODEL_NAME, ws / ".infrec", experiment="infrec-versions-test")
    assert event["refitted"] and event["champion"] not in (v1_model, v2_model)
    assert snapshot(ws) == v1_files and champion(uri) == event["champion"]
    refit_tags = lineage(uri, f"models:/{MODEL_NAME}@champion")["tags"]
    assert refit_tags["dvc_data_version"] == "v1" and refit_tags["refit"] == "rollback to v1"


@pytest.mark.slow
def test_dvc_repro_metrics_and_plots(tmp_path):
    """dvc repro runs the stage commands; unchanged → no stage; a fit.* change → fit + evaluate."""
    ws = make_workspace(tmp_path, tmp_path / "remote")
    env = dict(os.environ, DVC_NO_ANALYTICS="1",
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("INFREC_STATE_DIR", None)
    dvc = [sys.executable, "-m", "dvc"]
    out = sh(ws, *dvc, "repro", env=env)
    for stage in ("generate", "ingest", "distill", "fit", "evaluate"):
        assert f"Running stage '{stage}'" in out
    out = sh(ws, *dvc, "repro", env=env)
    assert "Running stage" not in out
    raw = yaml.safe_load((ws / "params.yaml").read_text())
    raw["fit"]["depth"] = 2
    (ws / "params.yaml").write_text(yaml.safe_dump(raw))
    out = sh(ws, *dvc, "repro", env=env)
    ran = {s for s in ("generate", "ingest", "distill", "fit", "evaluate") if f"Running stage '{s}'" in out}
    assert ran == {"fit", "evaluate"}
    metrics = sh(ws, *dvc, "metrics", "show", "--json", env=env)
    assert "ndcg@10" in metrics and "fidelity_ndcg@10" in metrics
    plots = sh(ws, *dvc, "plots", "show", "--json", env=env)
    assert "distill_log.csv" in plots and "lambda_path" in plots
