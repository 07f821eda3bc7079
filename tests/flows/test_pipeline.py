"""The whole pipeline end to end on a small synthetic data set (real Prefect, real MLflow).

Order matters within this module: the promotion test at the end moves ``champion``.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tests.flows.conftest import MODEL_NAME

pytestmark = pytest.mark.slow


def _client(flow_env):
    import mlflow

    uri = flow_env.tracking_uri
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _aliases(flow_env) -> dict[str, str]:
    cl = _client(flow_env)
    out = {}
    for alias in ("champion", "previous", "challenger"):
        try:
            out[alias] = str(cl.get_model_version_by_alias(MODEL_NAME, alias).version)
        except Exception:  # noqa: BLE001 - alias not set
            pass
    return out


def _cli(args, **kw):
    from infrec.cli import app

    return CliRunner().invoke(app, args, **kw)


def test_first_run_registers_and_promotes(two_runs):
    first, _ = two_runs
    assert first["version"] == "1" and first["promoted"] is True
    assert first["verdict"]["passed"] is True
    assert first["champion"] == "1" and first["previous"] is None
    assert any("no champion yet" in r for r in first["verdict"]["reasons"])


def test_failing_candidate_never_moves_champion(two_runs, flow_env):
    _, second = two_runs
    assert second["version"] == "2" and second["promoted"] is False
    assert not second["verdict"]["passed"]
    failed = [g["name"] for g in second["verdict"]["gates"] if not g["passed"]]
    assert failed == ["fidelity"]
    # the same data + seeds give the same model: the champion gate compares equal numbers
    reasons = second["verdict"]["reasons"]
    assert any("champion v1" in r and "same data version" in r for r in reasons)
    assert _aliases(flow_env) == {"champion": "1", "challenger": "2"}
    tags = _client(flow_env).get_model_version(MODEL_NAME, "2").tags
    assert tags["gate.passed"] == "false" and tags["promoted"] == "false"
    assert "FAIL fidelity" in tags["gate.reasons"]


def test_run_is_tracked_with_metrics_curves_plots_and_lineage(two_runs, flow_env):
    from models.metrics import METRIC_KEYS

    first, _ = two_runs
    cl = _client(flow_env)
    run = cl.get_run(first["run_id"])
    metrics, tags, params = run.data.metrics, run.data.tags, run.data.params
    for split in ("val", "test"):
        for k in METRIC_KEYS:
            key = k.replace("@", "_at_")
            assert f"{split}/{key}" in metrics
            assert f"poprec/{split}/{key}" in metrics and f"ease/{split}/{key}" in metrics
            assert f"reference/{split}/{key}" in metrics
    assert metrics["val/ndcg_at_10"] == pytest.approx(first["candidate"]["val"]["ndcg@10"])
    lam_path = cl.get_metric_history(first["run_id"], "lambda_path/val/ndcg_at_10")
    assert len(lam_path) == 6  # the λ grid of the candidate's ∞-AE (on all users: fit.lambdas)
    assert tags["data_hash"] == first["data_version"]  # unversioned run: the content hash
    assert run.info.run_name.startswith(first["data_version"] + "-")
    assert tags["summary_hash"] == first["summary_hash"]
    assert tags["prefect_flow_run_id"] == first["flow_run_id"]
    assert tags["git_commit"] and tags["gate.passed"] == "true"
    assert params["distill.sampler"] == "distill-cf" and params["gates.ease_fraction"] == "0.5"
    loss = cl.get_metric_history(first["run_id"], "distill/loss")
    assert [m.step for m in sorted(loss, key=lambda m: m.step)] == [1, 2, 3, 4, 5, 6]
    evaluated = cl.get_metric_history(first["run_id"], "distill/val_hr_at_100")
    assert {m.step for m in evaluated} == {0, 3, 6}
    names = {a.path for a in cl.list_artifacts(first["run_id"], "plots")}
    assert names == {"plots/distill_curve.png", "plots/lambda_path.png"}
    mv = cl.get_model_version(MODEL_NAME, "1")
    assert mv.run_id == first["run_id"]
    for tag in ("data_hash", "summary_hash", "git_commit", "prefect_flow_run_id", "params_hash",
                "input_sha256"):
        assert mv.tags[tag]


def test_prefect_report_artifact(two_runs):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    _, second = two_runs
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["infrec-pipeline-report"]))
        )
    texts = [a.data for a in arts]
    assert len(texts) == 2
    latest = next(t for t in texts if second["run_id"] in t)
    assert f"{MODEL_NAME} v2" in latest and "REJECTED" in latest
    assert "| fidelity | FAIL |" in latest and "∞-AE on all users) | test |" in latest


def test_a_rejected_run_is_named_rejected_in_prefect(two_runs):
    """The Prefect UI shows the verdict: state `Rejected` (type COMPLETED: the run worked) with
    the failing gates in its message; a promoting run stays `Completed`."""
    from uuid import UUID

    from prefect.client.orchestration import get_client

    first, second = two_runs
    with get_client(sync_client=True) as client:
        rejected = client.read_flow_run(UUID(second["flow_run_id"])).state
        promoted = client.read_flow_run(UUID(first["flow_run_id"])).state
    assert rejected.name == "Rejected" and rejected.is_completed()
    assert rejected.message == f"rejected: {MODEL_NAME} v2; failing gates: fidelity"
    assert promoted.name == "Completed" and promoted.is_completed()


def test_a_champion_of_another_catalogue_is_not_compared(two_runs, flow_env, tmp_path):
    """Gate (b) on data whose items the champion does not know (the same log, every item id
    moved): the real champion model is loaded, found to know 0% of the items, and skipped with
    that reason; on its own catalogue it is compared as before. Versions record the catalogue."""
    import polars as pl

    from tasks import promote
    from tasks.data import load_dataset
    from tasks.gates import catalogue_fingerprint, evaluated_users
    from tasks.ingest import ingest

    other_log = tmp_path / "other-items.csv"
    pl.read_csv(flow_env.input_csv).with_columns(pl.col("item_id") + 1_000_000).write_csv(
        other_log)
    ingest(other_log, tmp_path / "processed")
    other = load_dataset(tmp_path / "processed")
    params = flow_env.params()
    champion = promote.champion_comparison(params, None, other, other.data_version)
    assert champion["test"] is None and "knows 0% of this data's" in champion["other_catalogue"]
    verdict = promote.decide(params, two_runs[1]["evaluation"], champion, evaluated_users(other))
    gate = {g.name: g for g in verdict.gates}["champion"]
    assert gate.passed and gate.reason.startswith(f"skipped: champion v{champion['version']} "
                                                  "is of another catalogue")
    own = load_dataset(params.paths().processed)
    assert promote.champion_comparison(params, None, own, own.data_version)["test"]["ndcg@10"] > 0
    tags = _client(flow_env).get_model_version(MODEL_NAME, champion["version"]).tags
    assert tags["catalogue"] == catalogue_fingerprint(own.item_ids)
    assert tags["catalogue"] != catalogue_fingerprint(other.item_ids)


def test_status_json(two_runs, flow_env, restore_environ):
    res = _cli(["status", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["tracking_uri"] == flow_env.tracking_uri
    assert info["champion"]["version"] == "1"
    assert info["champion"]["data_version"] == two_runs[0]["data_version"]
    expected = two_runs[0]["candidate"]["test"]["ndcg@10"]
    assert info["champion"]["test"]["ndcg@10"] == pytest.approx(expected)
    last = info["last_run"]
    assert last["version"] == "2" and last["promoted"] is False
    assert any(r.startswith("FAIL fidelity") for r in last["reasons"])
    assert "≥" in res.stdout and "\\u2265" not in res.stdout  # plain UTF-8, not escapes


def test_bad_input_is_one_line_error(two_runs, flow_env, restore_environ, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,item_id\n1,2\n1,x\n")
    params = flow_env.params_file("params-bad-input.yaml")
    res = _cli(["run", "--input", str(bad), "--params", str(params)])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert res.stderr.startswith(f"error: {bad}: line 3") and "Traceback" not in res.output
    missing = _cli(["run", "--input", str(tmp_path / "nope.csv"), "--params", str(params)])
    assert missing.exit_code == 2
    assert missing.stderr.strip() == f"error: {tmp_path / 'nope.csv'}: input file not found"
    assert _aliases(flow_env)["champion"] == "1"


def test_promote_rechecks_gates_and_force_records_who_and_why(two_runs, flow_env, restore_environ):
    strict = flow_env.params_file("params-strict.yaml", gates={"fidelity_fraction": 2.0})
    res = _cli(["promote", "2", "--params", str(strict)])
    assert res.exit_code == 1 and "FAIL fidelity" in res.stdout
    assert _aliases(flow_env)["champion"] == "1"
    res = _cli(["promote", "2", "--force", "--params", str(strict)])
    assert res.exit_code == 2 and "--reason" in res.stderr
    res = _cli(["promote", "2", "--force", "--reason", "test override", "--params", str(strict)])
    assert res.exit_code == 0, res.output
    assert "FORCED" in res.stdout
    assert _aliases(flow_env) == {"champion": "2", "previous": "1"}
    tags = _client(flow_env).get_model_version(MODEL_NAME, "2").tags
    assert tags["promotion.reason"] == "test override" and tags["promotion.forced_by"]
    # lenient gates: v1 passes the re-check and moves back (v2 becomes previous)
    lenient = flow_env.params_file("params-lenient.yaml")
    res = _cli(["promote", "1", "--params", str(lenient)])
    assert res.exit_code == 0, res.output
    assert _aliases(flow_env) == {"champion": "1", "previous": "2"}


def test_a_four_user_log_on_a_fresh_project_is_never_promoted(flow_env, tmp_path):
    """A log of 4 users, a fresh state and registry (no champion), the lenient test gates: the
    evidence gate (4 < gates.min_eval_users test users) refuses it; nothing is champion."""
    import mlflow

    from flows.pipeline import run_pipeline
    from tasks.params import parse_params

    log = tmp_path / "four.csv"
    log.write_text("user_id,item_id\n" + "".join(
        f"{u},{i}\n" for u in range(1, 5) for i in range(10 * u, 10 * u + 6)))
    raw = {k: dict(v) for k, v in flow_env.params().to_dict().items() if isinstance(v, dict)}
    raw["ingest"]["input"] = str(log)
    raw["distill"].update(sampler="random", steps=0)  # the cheapest summary: the gates matter
    raw["registry"] = {"model_name": "tiny-infae", "experiment": "tiny"}
    raw.update(state_dir=str(tmp_path / "state"), reports_dir=str(tmp_path / "reports"))
    result = run_pipeline(parse_params(raw, "tiny params"))
    assert result["promoted"] is False and result["champion"] is None
    gates = {g["name"]: g for g in result["verdict"]["gates"]}
    assert not gates["evidence"]["passed"]
    assert "evaluated on 4 test users (need ≥ 50)" in gates["evidence"]["reason"]
    assert "inf" not in " ".join(result["verdict"]["reasons"])
    cl = mlflow.MlflowClient(tracking_uri=flow_env.tracking_uri,
                             registry_uri=flow_env.tracking_uri)
    with pytest.raises(mlflow.exceptions.MlflowException):  # no champion alias at all
        cl.get_model_version_by_alias("tiny-infae", "champion")
    assert cl.get_model_version("tiny-infae", result["version"]).tags["eval_users"] == "4"
