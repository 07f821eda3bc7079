"""params.yaml parsing: defaults, one-line errors, state and tracking locations."""

from __future__ import annotations

from pathlib import Path

import pytest

from infrec.config import Params, load_params, parse_params, runtime_environment
from tasks.errors import InputError

ROOT = Path(__file__).resolve().parents[2]


def test_project_params_file_parses_with_pipeline_defaults():
    p = load_params(ROOT / "params.yaml")
    assert p.generate.users == 3000 and p.generate.items == 1000
    assert p.gates.ease_fraction == 0.97 and p.gates.fidelity_fraction == 0.95
    assert p.registry.model_name == "infrec-infae"
    assert p.state_dir == ".infrec"


@pytest.mark.parametrize(
    "raw, where",
    [
        ({"gates": {"ease_fraction": "high"}}, "gates.ease_fraction"),
        ({"gates": {"eas_fraction": 0.9}}, "gates.eas_fraction"),  # typo in an owned section
        ({"distill": {"sampler": "kmeans"}}, "distill.sampler"),
        ({"gates": {"metric": "ndcg@5"}}, "gates.metric"),
        ({"fit": {"lambdas": []}}, "fit.lambdas"),
    ],
)
def test_bad_values_give_one_line_errors(raw, where):
    with pytest.raises(InputError) as err:
        parse_params(raw, "params.yaml")
    msg = str(err.value)
    assert msg.startswith(f"params.yaml: {where}") and "\n" not in msg


def test_shared_sections_and_unknown_top_level_keys_are_kept():
    p = parse_params({"ingest": {"seed": 3, "future_option": 1}, "schedule": {"cron": "0 3 * * *"}})
    assert p.ingest.seed == 3


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("gates: [unclosed\n")
    with pytest.raises(InputError, match="invalid YAML"):
        load_params(bad)
    with pytest.raises(InputError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_state_and_tracking_locations(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("INFREC_STATE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    p = Params()
    assert p.state_path() == tmp_path / ".infrec"
    assert p.tracking_uri() == f"sqlite:///{tmp_path / '.infrec' / 'mlflow.db'}"
    assert p.artifact_root() == tmp_path / ".infrec" / "mlartifacts"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert p.resolved().tracking.uri == "http://127.0.0.1:5000"
    monkeypatch.setenv("INFREC_STATE_DIR", str(tmp_path / "elsewhere"))
    assert Path(p.resolved().state_dir) == tmp_path / "elsewhere"


def test_runtime_environment_uses_project_prefect_home_only_without_api(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("INFREC_STATE_DIR", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    env = runtime_environment(Params())
    assert env["PREFECT_HOME"] == str(tmp_path / ".infrec" / "prefect")
    assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / ".infrec" / "jax-cache")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert "PREFECT_HOME" not in runtime_environment(Params())
