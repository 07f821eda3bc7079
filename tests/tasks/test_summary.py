"""Summary files (write/read round trip, bad files) and `distill_dataset` / `infrec distill`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.errors import InputError
from tasks.summary import FORMAT_VERSION, MIN_WEIGHT, read_summary, write_summary

REPO = Path(__file__).resolve().parents[2]
from tests.helpers import clean_env  # noqa: E402
INFREC = [sys.executable, "-m", "infrec.cli"]


def _support(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    support = rng.random((7, 11)).astype(np.float32)
    support[support < 0.6] = 0.0
    support[0, :] = 0.0  # an empty synthetic user survives the round trip
    support[1, 2] = 5e-7  # below MIN_WEIGHT: dropped
    return support


def test_round_trip_is_sparse_and_self_describing(tmp_path):
    support = _support()
    item_ids = np.arange(11, dtype=np.int64) * 7 + 3
    meta = {"sampler": "distill-cf", "budget": 7, "seed": 5,
            "config": {"tau": 10.0, "lambdas": (1e-5, 5.0)},
            "source": {"data_version": "abc123"}, "val": {"hr@100": np.float64(41.5)}}
    path = write_summary(tmp_path / "s.parquet", support, item_ids, meta)
    assert [p.name for p in tmp_path.iterdir()] == ["s.parquet"]  # no temporary left behind

    table = pq.read_table(path)
    assert table.schema.field("synthetic_user").type == pa.int32()
    assert table.schema.field("item").type == pa.int32()
    assert table.schema.field("weight").type == pa.float32()
    assert table.num_rows == int((support > MIN_WEIGHT).sum())

    back, ids, info = read_summary(path)
    expected = np.where(support > MIN_WEIGHT, support, 0.0)
    assert back.dtype == np.float32 and back.shape == (7, 11)
    np.testing.assert_array_equal(back, expected)
    np.testing.assert_array_equal(ids, item_ids)
    assert ids.dtype == np.int64
    assert info["format"] == FORMAT_VERSION and info["shape"] == [7, 11]
    assert info["sampler"] == "distill-cf" and info["seed"] == 5 and info["budget"] == 7
    assert info["config"] == {"tau": 10.0, "lambdas": [1e-5, 5.0]}
    assert info["source"]["data_version"] == "abc123" and info["val"]["hr@100"] == 41.5
    assert "item_ids" not in info


def test_overwrite_replaces_atomically(tmp_path):
    path = tmp_path / "s.parquet"
    write_summary(path, _support(0), np.arange(11), {"seed": 0})
    write_summary(path, _support(1), np.arange(11), {"seed": 1})
    back, _, info = read_summary(path)
    assert info["seed"] == 1
    np.testing.assert_array_equal(back, np.where(_support(1) > MIN_WEIGHT, _support(1), 0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.parquet"]


def test_write_rejects_mismatched_item_map(tmp_path):
    with pytest.raises(ValueError):
        write_summary(tmp_path / "s.parquet", _support(), np.arange(10), {})
    assert not (tmp_path / "s.parquet").exists()


def _one_line(exc: pytest.ExceptionInfo, path: Path) -> str:
    message = str(exc.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.parquet"
    with pytest.raises(InputError) as exc:
        read_summary(path)
    assert "no such" in _one_line(exc, path)


def test_garbage_file(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"this is not parquet\n" * 10)
    with pytest.raises(InputError) as exc:
        read_summary(path)
    _one_line(exc, path)


def test_parquet_without_summary_metadata(tmp_path):
    path = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"synthetic_user": [0], "item": [1], "weight": [1.0]}), path)
    with pytest.raises(InputError) as exc:
        read_summary(path)
    assert "not a data summary" in _one_line(exc, path)


def test_entries_outside_the_declared_shape(tmp_path):
    path = tmp_path / "s.parquet"
    write_summary(path, _support(), np.arange(11), {})
    table = pq.read_table(path)
    bad = table.set_column(1, "item", pa.array(np.full(table.num_rows, 99, np.int32)))
    pq.write_table(bad.replace_schema_metadata(table.schema.metadata), path)
    with pytest.raises(InputError) as exc:
        read_summary(path)
    assert "outside" in _one_line(exc, path)


# -- distill_dataset and the CLI on a small ingested data set ----------------------------------
@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    from tasks.ingest import ingest
    from tasks.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("distilldata")
    write_synthetic(root / "raw.csv", n_users=300, n_items=120, seed=4)
    ingest(root / "raw.csv", root / "processed", seed=0)
    return root / "processed"


@pytest.mark.parametrize("sampler", ["random", "head"])
def test_sampler_summaries(processed, tmp_path, sampler):
    from tasks.data import load_dataset
    from tasks.distill import distill_dataset

    out = tmp_path / f"{sampler}.parquet"
    report = distill_dataset(processed, out, sampler=sampler, budget=15, seed=2)
    support, ids, meta = read_summary(out)
    dataset = load_dataset(processed)
    assert support.shape == (15, dataset.n_items) and set(np.unique(support)) <= {0.0, 1.0}
    np.testing.assert_array_equal(ids, dataset.item_ids)
    assert meta["sampler"] == sampler and meta["source"]["data_version"] == dataset.data_version
    np.testing.assert_array_equal(support, dataset.train[meta["users"]].toarray())
    assert report["sampler"] == sampler and report["steps_run"] == 0 and "hr@100" in report["val"]
    assert "data_dir" not in json.dumps(meta)  # no machine path in the summary file


def test_distill_cf_summary_and_log(processed, tmp_path):
    from tasks.distill import distill_dataset

    out = tmp_path / "dcf.parquet"
    log = tmp_path / "dcf.log.jsonl"
    report = distill_dataset(processed, out, budget=10, steps=6, samples=20, seed=1,
                             log_path=log, eval_steps=[3], eval_every=100,
                             select_metric="ndcg@10")
    assert report["steps_run"] == 6
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(7))
    assert {"step", "loss", "seconds", "lambda"} <= set(rows[1])
    assert "val_ndcg@10" in rows[3] and "val_ndcg@10" not in rows[2]
    # the best evaluation by the selection metric, the starting point (step 0) included
    evaluated = {r["step"]: r["val_ndcg@10"] for r in rows if r.get("evaluated")}
    assert report["best_step"] == max(evaluated, key=lambda k: (evaluated[k], -k))
    support, _, meta = read_summary(out)
    assert support.shape[0] == 10 and 0.0 <= support.min() and support.max() <= 1.0
    assert meta["config"]["samples"] == 20 and meta["config"]["max_steps"] == 6
    assert meta["best_step"] == report["best_step"]
    assert meta["seed"] == 1 and len(meta["init_users"]) == 10
    assert [r["step"] for r in report["curve"]] == list(range(7))


def test_budget_above_the_users_is_capped_and_recorded(processed, tmp_path):
    from tasks.data import load_dataset
    from tasks.distill import distill_dataset

    n = load_dataset(processed).n_users
    report = distill_dataset(processed, tmp_path / "x.parquet", sampler="random", budget=10**6)
    assert report["budget"] == n and report["budget_requested"] == 10**6
    assert read_summary(tmp_path / "x.parquet")[2]["budget"] == n


def test_distill_dataset_input_errors(processed, tmp_path):
    from tasks.distill import distill_dataset

    with pytest.raises(InputError, match="unknown sampler"):
        distill_dataset(processed, tmp_path / "x.parquet", sampler="best")
    with pytest.raises(InputError, match="unknown distill option"):
        distill_dataset(processed, tmp_path / "x.parquet", colour="blue")
    with pytest.raises(InputError):
        distill_dataset(tmp_path / "missing", tmp_path / "x.parquet")


@pytest.mark.slow
def test_distill_stage_reports_the_summary_beside_random_users(processed, tmp_path):
    """`infrec distill --params`: summary, curve CSV, plot and the report with its baseline."""
    import shutil

    state = tmp_path / "state"
    shutil.copytree(processed, state / "data" / "processed")
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({
        "state_dir": str(state), "reports_dir": str(tmp_path / "reports"),
        "distill": {"sampler": "distill-cf", "budget": 12, "steps": 4, "samples": 8,
                    "eval_every": 2, "seed": 3}}))
    proc = subprocess.run([*INFREC, "distill", "--params", str(params), "--quiet"],
                          capture_output=True, text=True, cwd=REPO,
                          env=clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "reports" / "distill.json").read_text())
    assert report == json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["budget"] == 12 and report["select_metric"] == "ndcg@10"
    assert set(report["random_users"]) == {"lambda", "val", "test", "test_ci95", "coverage"}
    # the catalogue the summary touches, beside the random users'; every user checked (no cap)
    for cov in (report["coverage"], report["random_users"]["coverage"]):
        assert 0 < cov["items"] <= 1 and 0 < cov["interactions"] <= 1
    assert report["eval_users"] == report["eval_population"] > 0
    assert report["init_val"] == report["random_users"]["val"]  # it starts from those users
    curve = (tmp_path / "reports" / "distill_curve.csv").read_text().splitlines()
    assert curve[0] == "step,loss,lambda,val_ndcg@10,val_hr@100" and len(curve) == 6
    assert "seconds" not in curve[0]  # deterministic: no timings in a committed file
    assert (tmp_path / "reports" / "plots" / "distill_curve.png").is_file()
    assert read_summary(state / "data" / "summary.parquet")[0].shape[0] == 12

    bad = subprocess.run([*INFREC, "distill", "--params", str(tmp_path / "nowhere.yaml")],
                         capture_output=True, text=True, cwd=REPO,
                          env=clean_env())
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1
