"""`infrec fit`: model directory, metrics.json, reload in a new process, bad input, real data."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.metrics import METRIC_KEYS
from tasks.data import load_dataset
from tasks.errors import InputError
from tasks.fit import fit, load_model

REPO = Path(__file__).resolve().parents[2]
INFREC = [sys.executable, "-m", "infrec.cli"]


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    from tasks.ingest import ingest
    from tasks.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("fitdata")
    write_synthetic(root / "raw.csv", n_users=400, n_items=150, seed=3)
    ingest(root / "raw.csv", root / "processed", seed=0)
    return root / "processed"


@pytest.fixture(scope="module")
def fitted(processed, tmp_path_factory):
    out = tmp_path_factory.mktemp("fitmodel") / "model"
    proc = subprocess.run(
        [*INFREC, "fit", "--data", str(processed), "--out", str(out), "--lambdas", "1,5,20", "--quiet"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


def test_fit_writes_model_and_metrics(fitted):
    out, printed = fitted
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == printed
    assert set(metrics) == {"lambda", "val", "test"}
    assert metrics["lambda"] in (1.0, 5.0, 20.0)
    for split in ("val", "test"):
        assert list(metrics[split]) == list(METRIC_KEYS)
        assert 0 < metrics[split]["hr@100"] <= 100 and 0.5 < metrics[split]["auc"] <= 1
    path = json.loads((out / "lambda_path.json").read_text())
    assert [p["lambda"] for p in path] == [1.0, 5.0, 20.0]
    chosen = max(path, key=lambda p: p["hr@100"])
    assert chosen["lambda"] == metrics["lambda"]
    assert not list(out.parent.glob(".model.tmp-*"))


def test_reloaded_model_gives_identical_top10_in_new_process(fitted, processed):
    out, _ = fitted
    model, items, info = load_model(out)
    ds = load_dataset(processed)
    assert np.array_equal(items, ds.item_ids)
    here, _ = model.recommend(ds.train[:50], k=10)
    code = (
        "import sys, numpy as np; from tasks.fit import load_model; from tasks.data import load_dataset;"
        f"m,_,_=load_model({str(out)!r}); d=load_dataset({str(processed)!r});"
        "np.save(sys.stdout.buffer, m.recommend(d.train[:50], k=10)[0])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    import io

    there = np.load(io.BytesIO(proc.stdout))
    np.testing.assert_array_equal(here, there)


def test_fit_refuses_existing_output_and_bad_data_dir(processed, fitted, tmp_path):
    out, _ = fitted
    with pytest.raises(InputError, match="already exists"):
        fit(processed, out)
    proc = subprocess.run(
        [*INFREC, "fit", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "m")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m").exists()


def test_fit_bad_lambda_option_is_one_line(processed, tmp_path):
    proc = subprocess.run(
        [*INFREC, "fit", "--data", str(processed), "--out", str(tmp_path / "m"), "--lambdas", "a,b"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 2 and "--lambdas" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m").exists()


def test_user_support_sample(processed, tmp_path):
    report = fit(processed, tmp_path / "m", user_support=0.5, lambdas=[1, 5])
    info = json.loads((tmp_path / "m" / "model.json").read_text())
    assert info["support"]["kind"] == "user_sample" and info["n_support"] == report["support"]["rows"]
    assert info["n_support"] == round(0.5 * load_dataset(processed).n_users)


@pytest.mark.realdata
@pytest.mark.slow
def test_ml1m_reproduces_paper_figures(ml1m_path, tmp_path):
    """∞-AE on all ML-1M users: test nDCG@10 / HR@10 within 0.5 of the benchmark (33.39 / 31.91)."""
    from tasks.ingest import ingest

    ingest(ml1m_path, tmp_path / "ml1m")
    report = fit(tmp_path / "ml1m", tmp_path / "model")
    test = report["metrics"]["test"]
    assert report["metrics"]["lambda"] == 5.0
    assert abs(test["ndcg@10"] - 33.39) <= 0.5, test
    assert abs(test["hr@10"] - 31.91) <= 0.5, test
