"""params.yaml: strict validation (every section and key known, finite numbers, non-empty
lists), one-line errors naming the key, locations, and the in-place editor of a params file."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from tasks.errors import InputError
from tasks.params import (METRIC_KEYS, Params, load_params, parse_params, redact, set_in_file,
                          with_overrides)
from tasks.runtime import runtime_environment

ROOT = Path(__file__).resolve().parents[2]


def test_project_params_file_parses_and_sets_every_key():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    p = load_params(ROOT / "params.yaml")
    assert p.generate.users == 3000 and p.selection.metric == "ndcg@10"
    assert p.state_dir == ".infrec" and p.reports_dir == "reports"
    # the shipped file spells out every section and key of the model
    for name, field in Params.model_fields.items():
        assert name in raw, name
        annotation = field.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            assert set(raw[name]) == set(annotation.model_fields), name


def test_metric_keys_match_the_models_metrics():
    from models.metrics import METRIC_KEYS as MODEL_KEYS

    assert tuple(METRIC_KEYS) == tuple(MODEL_KEYS)


@pytest.mark.parametrize(
    "raw, where",
    [
        ({"fit": {"dpeth": 2}}, "fit.dpeth"),  # a typo in a section
        ({"gatse": {"pop_margin": 1}}, "gatse"),  # a misspelt section
        ({"gates": {"ease_fraction": "high"}}, "gates.ease_fraction"),
        ({"distill": {"sampler": "kmeans"}}, "distill.sampler"),
        ({"distill": {"options": {"patience": 3}}}, "distill.options"),
        ({"selection": {"metric": "ndcg@5"}}, "selection.metric"),
        ({"fit": {"lambdas": []}}, "fit.lambdas"),
        ({"fit": {"summary_lambdas": [1, -1]}}, "fit.summary_lambdas"),
        ({"fit": {"lambdas": [1.0, math.nan]}}, "fit.lambdas.1"),
        ({"fit": {"lambdas": [math.inf]}}, "fit.lambdas.0"),
        ({"gates": {"pop_margin": math.nan}}, "gates.pop_margin"),
        ({"distill": {"budget": 0}}, "distill.budget"),
        ({"distill": {"tau": math.inf}}, "distill.tau"),
        ({"ingest": {"min_user_interactions": 0}}, "ingest.min_user_interactions"),
        ({"ingest": {"input": " "}}, "ingest.input"),
        ({"evaluate": {"ease_lambdas": []}}, "evaluate.ease_lambdas"),
        ({"schedule": {"cron": "every day"}}, "schedule.cron"),
        ({"schedule": {"timezone": "Mars/Olympus"}}, "schedule.timezone"),
        ({"tracking": {"uri": "http://user:s3cret@mlflow.example"}}, "tracking.uri"),
        ({"serving": {"max_k": 0}}, "serving.max_k"),
        ({"registry": {"model_name": "bad name!"}}, "registry.model_name"),
        ({"state_dir": ""}, "state_dir"),
    ],
)
def test_bad_values_give_one_line_errors_naming_the_key(raw, where):
    with pytest.raises(InputError) as err:
        parse_params(raw, "params.yaml")
    msg = str(err.value)
    assert msg.startswith(f"params.yaml: {where}:"), msg
    assert "\n" not in msg
    assert "s3cret" not in msg


def test_empty_section_means_defaults_and_params_are_frozen():
    p = parse_params({"fit": None, "gates": {}})
    assert p.fit.depth == 1
    with pytest.raises(Exception):
        p.fit.depth = 3  # frozen


def test_bad_yaml_missing_file_and_non_mapping(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("gates: [unclosed\n")
    with pytest.raises(InputError, match=r"params.yaml: line \d+: invalid YAML"):
        load_params(bad)
    with pytest.raises(InputError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad.write_text("- a\n- b\n")
    with pytest.raises(InputError, match="expected a mapping"):
        load_params(bad)
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputError, match="not a text"):
        load_params(bad)


def test_locations(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("INFREC_STATE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    p = Params()
    assert p.state_path() == tmp_path / ".infrec"
    assert p.paths().processed == tmp_path / ".infrec" / "data" / "processed"
    assert p.paths().metrics == tmp_path / "reports" / "metrics.json"
    # where `mlflow ui` / `mlflow models serve` look by default
    assert p.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert p.tracking_uri() == "http://127.0.0.1:5000"
    # resolved params never carry the tracking URI (it may hold credentials)
    assert p.resolved().tracking.uri is None
    monkeypatch.setenv("INFREC_STATE_DIR", str(tmp_path / "elsewhere"))
    assert Path(p.resolved().state_dir) == tmp_path / "elsewhere"
    q = with_overrides(p, {"ingest.input": "logs/x.csv"}).resolved()
    assert q.ingest.input == str(tmp_path / "logs" / "x.csv")


def test_runtime_environment_uses_project_prefect_home_only_without_api(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key in ("INFREC_STATE_DIR", "PREFECT_API_URL", "PREFECT_HOME", "JAX_COMPILATION_CACHE_DIR"):
        monkeypatch.delenv(key, raising=False)
    env = runtime_environment(Params())
    assert env["PREFECT_HOME"] == str(tmp_path / ".infrec" / "prefect")
    assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / ".infrec" / "jax-cache")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert "PREFECT_HOME" not in runtime_environment(Params())


def test_set_in_file_keeps_comments_and_everything_else(tmp_path):
    path = tmp_path / "params.yaml"
    text = (ROOT / "params.yaml").read_text()
    path.write_text(text)
    assert set_in_file(path, "ingest.input", "logs/ratings.csv")
    assert not set_in_file(path, "ingest.input", "logs/ratings.csv")
    new = path.read_text()
    changed = [(a, b) for a, b in zip(text.splitlines(), new.splitlines()) if a != b]
    assert len(changed) == 1 and changed[0][1].startswith('  input: "logs/ratings.csv"  ')
    assert "# your interactions file" in changed[0][1]  # the comment stays
    assert load_params(path).ingest.input == "logs/ratings.csv"
    # a file without the key or the section gets them added
    path.write_text("fit:\n  depth: 2\n")
    assert set_in_file(path, "ingest.input", "a.csv")
    assert load_params(path).ingest.input == "a.csv" and load_params(path).fit.depth == 2


def test_redact_hides_credentials():
    assert redact("http://bob:tok3n@host:5000/x") == "http://***@host:5000/x"
    assert redact("see postgresql://u:p@db/mlflow now") == "see postgresql://***@db/mlflow now"
    assert redact("http://host:5000") == "http://host:5000"


def test_set_in_file_replaces_block_lists_and_writes_floats_yaml_reads_back(tmp_path):
    """A rollback sets values of any shape: a block `- item` list is replaced whole, and 1e-05
    is written so that YAML reads a float (YAML 1.1 reads `1e-05` as a string)."""
    import yaml

    from tasks.params import set_in_file

    path = tmp_path / "params.yaml"
    path.write_text("fit:\n  summary_lambdas:\n  - 0.1\n  - 1.0\n  depth: 1   # layers\n")
    assert set_in_file(path, "fit.summary_lambdas", [1e-05, 0.001, 5.0])
    assert yaml.safe_load(path.read_text())["fit"] == {"summary_lambdas": [1e-05, 0.001, 5.0],
                                                       "depth": 1}
    assert "# layers" in path.read_text()
