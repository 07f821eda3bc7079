"""bench.distill_cf runs on any ingested directory or raw file and reports candidate, random, full."""

from __future__ import annotations

import json

import pytest

from tasks.ingest import ingest
from tasks.synthetic import write_taste_popularity

pytestmark = pytest.mark.slow  # `make test-fast` leaves it out: the Distill-CF bench as a subprocess

FAST = ["--budget", "30", "--steps", "4", "--samples", "10", "--eval-every", "2",
        "--eval-steps", "", "--metric", "ndcg@10"]


@pytest.fixture(scope="module")
def small_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "taste.csv"
    write_taste_popularity(path, n_users=150, n_items=200, seed=2)
    return path


def test_bench_on_an_ingested_directory(small_log, tmp_path, capsys):
    from bench.distill_cf import main

    ingest(small_log, tmp_path / "processed")
    out = main(["--data", str(tmp_path / "processed"), *FAST, "--keep", str(tmp_path / "kept")])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["select_metric"] == "ndcg@10" and printed["budget"] == 30
    for name in ("candidate", "random", "full"):
        assert set(printed[name]) == {"lambda", "val", "test", "lambda_path"}
        assert len(printed[name]["test"]) == 7
    assert printed["fidelity"] == pytest.approx(
        out["candidate"]["test"]["ndcg@10"] / out["full"]["test"]["ndcg@10"])
    # the candidate is never worse on validation than the random users it started from
    assert printed["candidate"]["val"]["ndcg@10"] >= printed["random"]["val"]["ndcg@10"] - 1e-9
    assert printed["steps_run"] == 4 and printed["evaluations"] == 3
    assert (tmp_path / "kept" / "summary.npy").is_file()
    assert len((tmp_path / "kept" / "summary.log.jsonl").read_text().splitlines()) == 5


def test_bench_on_a_raw_file(small_log, capsys):
    from bench.distill_cf import main

    out = main(["--data", str(small_log), *FAST, "--no-full", "--metric", "hr@100"])
    assert out["select_metric"] == "hr@100" and "full" not in out and "fidelity" not in out
    assert out["config"]["select_metric"] == "hr@100"
