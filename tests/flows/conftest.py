"""Fixtures for the pipeline tests: real Prefect (test harness, temporary PREFECT_HOME) and real
MLflow on SQLite in a temporary directory. Nothing is set at import time; everything set here is
undone when the tests/flows package ends (nothing leaks into later tests)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

MODEL_NAME = "infrec-infae"

# Small but real: 400 users × 200 items, a short Distill-CF run (100 synthetic users, 6 steps),
# lenient gates (the gate thresholds are tested on hand-made numbers in test_gates.py).
SMALL_PARAMS: dict[str, Any] = {
    "generate": {"users": 400, "items": 200, "seed": 0},
    "distill": {"sampler": "distill-cf", "budget": 100, "seed": 0, "steps": 6, "samples": 8,
                "eval_every": 3},
    "evaluate": {"ease_lambdas": [10.0, 100.0, 500.0]},
    "gates": {"pop_margin": 0.0, "ease_fraction": 0.5, "champion_epsilon": 0.5,
              "fidelity_fraction": 0.5},
    "registry": {"model_name": MODEL_NAME, "experiment": "infrec-test"},
}


@dataclass(frozen=True)
class FlowEnv:
    root: Path
    state_dir: Path
    tracking_uri: str
    input_csv: Path

    def params(self, **sections: dict[str, Any]):
        """Validated params: SMALL_PARAMS with some sections' keys overridden."""
        from tasks.params import parse_params

        raw = {k: dict(v) for k, v in SMALL_PARAMS.items()}
        raw["ingest"] = {"input": str(self.input_csv)}
        for name, values in sections.items():
            raw.setdefault(name, {}).update(values)
        raw["state_dir"] = str(self.state_dir)
        raw["reports_dir"] = str(self.root / "reports")
        return parse_params(raw, "test params")

    def params_file(self, name: str, **sections: dict[str, Any]) -> Path:
        """The same params written as a YAML file (for the CLI)."""
        path = self.root / name
        path.write_text(yaml.safe_dump(self.params(**sections).model_dump(mode="json")))
        return path

    def subprocess_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        return env


@pytest.fixture(scope="package")
def flow_env(tmp_path_factory) -> FlowEnv:
    """Temporary PREFECT_HOME + ``prefect_test_harness`` + MLflow SQLite in a temp dir."""
    root = tmp_path_factory.mktemp("pipeline")
    home = root / "prefect-home"
    home.mkdir()
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("PREFECT_HOME", str(home))
    mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    mp.delenv("PREFECT_API_URL", raising=False)
    mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mp.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        from prefect.settings import PREFECT_HOME, temporary_settings
        from prefect.testing.utilities import prefect_test_harness

        from tasks.synthetic import write_synthetic

        input_csv = root / "interactions.csv"
        write_synthetic(input_csv, n_users=400, n_items=200, seed=0)
        with temporary_settings(updates={PREFECT_HOME: home}):
            with prefect_test_harness(server_startup_timeout=90):
                yield FlowEnv(root=root, state_dir=root / "state", tracking_uri=tracking_uri,
                              input_csv=input_csv)
    finally:
        mp.undo()


@pytest.fixture(scope="package")
def two_runs(flow_env):
    """Run 1 (lenient gates) → champion v1; run 2 (impossible fidelity gate) → challenger v2."""
    from flows.pipeline import run_pipeline

    first = run_pipeline(flow_env.params())
    second = run_pipeline(flow_env.params(gates={"fidelity_fraction": 2.0}))
    return first, second


@pytest.fixture()
def restore_environ():
    """CLI commands update os.environ (runtime defaults): put it back after the test."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
