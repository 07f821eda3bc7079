"""The fit stage: model directory, reports, λ by the selection metric, reload in a new process,
bad input as one line, and ∞-AE on ML-1M reproducing the reference."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.metrics import METRIC_KEYS
from tasks.data import load_dataset
from tasks.errors import InputError
from tasks.fit import fit_dataset
from tasks.model_store import load_model, save_model
from tasks.params import parse_params

REPO = Path(__file__).resolve().parents[2]
from tests.helpers import clean_env  # noqa: E402

pytestmark = pytest.mark.slow  # `make test-fast` leaves it out: the fit stage end to end, ML-1M


@pytest.fixture(scope="module")
def stage_params(tmp_path_factory):
    """Params of a small state: generated data, ingested, a random-users summary."""
    from tasks import distill, ingest

    root = tmp_path_factory.mktemp("fitstage")
    p = parse_params({"state_dir": str(root / "state"), "reports_dir": str(root / "reports"),
                      "generate": {"users": 400, "items": 150, "seed": 3},
                      "distill": {"sampler": "random", "budget": 80, "steps": 0},
                      # ∞-AE on the summary alone: this file tests that fit (the families and
                      # fit.on full: tests/tasks/test_candidate.py)
                      "fit": {"summary_lambdas": [1, 5, 20], "on": "summary",
                              "families": ["infinite_ae"]}})
    quiet = lambda _m: None  # noqa: E731
    ingest.run(p, log=quiet)
    distill.run(p, log=quiet)
    return p


@pytest.fixture(scope="module")
def fitted(stage_params):
    """`infrec fit --params` in a new process, as dvc.yaml runs it."""
    path = Path(stage_params.state_dir).parent / "params.yaml"
    path.write_text(json.dumps(stage_params.to_dict()))
    proc = subprocess.run([sys.executable, "-m", "infrec", "fit", "--params", str(path), "-q"],
                          capture_output=True, text=True, cwd=REPO,
                          env=clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return stage_params.paths(), json.loads(proc.stdout.strip().splitlines()[-1])


def test_fit_writes_model_reports_and_plot(fitted):
    paths, printed = fitted
    from tasks.io import without_timings

    metrics = json.loads(paths.metrics.read_text())
    # what `infrec fit` prints, less its wall times: those are not in what DVC tracks
    stored = json.loads((paths.model / "metrics.json").read_text())
    assert metrics == without_timings(printed) == stored
    assert "seconds" not in json.dumps(metrics) and "seconds" in json.dumps(printed)
    assert metrics["lambda"] in (1.0, 5.0, 20.0)
    for split in ("val", "test"):
        assert list(metrics[split]) == list(METRIC_KEYS)
        assert 0 < metrics[split]["hr@100"] <= 100 and 0.5 < metrics[split]["auc"] <= 1
    path = json.loads(paths.lambda_path.read_text())
    assert [p["lambda"] for p in path] == [1.0, 5.0, 20.0]
    # λ is chosen by selection.metric (ndcg@10 by default), the first best in grid order
    best = max(p["ndcg@10"] for p in path)
    assert metrics["lambda"] == next(p["lambda"] for p in path if p["ndcg@10"] == best)
    assert (paths.plots / "lambda_path.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in paths.model.iterdir()) == [
        "alpha.npy", "item_map.parquet", "lambda_path.json", "metrics.json", "model.json",
        "support.npy"]
    assert not list(paths.model.parent.glob(".model.tmp-*"))


def test_model_files_are_reproducible(stage_params, tmp_path):
    """Same fit → same bytes (no timestamps): the model's DVC hash is reproducible."""
    from tasks.io import content_hash

    ds = load_dataset(stage_params.paths().processed)
    dirs = []
    for i in range(2):
        model, report = fit_dataset(ds, lambdas=[1, 5], select_metric="ndcg@10",
                                    support_path=stage_params.paths().summary)
        dirs.append(save_model(model, tmp_path / f"m{i}", ds.item_ids, report, ds.data_version))
    assert content_hash(dirs[0]) == content_hash(dirs[1])


def test_reloaded_model_gives_identical_top10_in_new_process(fitted, stage_params):
    paths, _ = fitted
    model, items, _ = load_model(paths.model)
    ds = load_dataset(paths.processed)
    assert np.array_equal(items, ds.item_ids)
    here, _ = model.recommend(ds.train[:50], k=10)
    code = (
        "import sys, numpy as np; from tasks.model_store import load_model;"
        "from tasks.data import load_dataset;"
        f"m,_,_=load_model({str(paths.model)!r}); d=load_dataset({str(paths.processed)!r});"
        "np.save(sys.stdout.buffer, m.recommend(d.train[:50], k=10)[0])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    import io

    np.testing.assert_array_equal(here, np.load(io.BytesIO(proc.stdout)))


def test_selection_metric_decides_lambda(stage_params):
    ds = load_dataset(stage_params.paths().processed)
    chosen = {}
    for metric in ("hr@100", "ndcg@10", "auc"):
        model, report = fit_dataset(ds, lambdas=[1e-5, 1, 5, 20, 100], select_metric=metric,
                                    support_path=stage_params.paths().summary)
        path = report["lambda_path"]
        best = max(p[metric] for p in path)
        assert model.lam == next(p["lambda"] for p in path if p[metric] == best)
        chosen[metric] = model.lam
    assert report["select_metric"] == "auc"


def test_missing_inputs_are_one_line_errors(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"state_dir": str(tmp_path / "state"),
                                  "reports_dir": str(tmp_path / "reports")}))
    proc = subprocess.run([sys.executable, "-m", "infrec", "fit", "--params", str(params)],
                          capture_output=True, text=True, cwd=REPO,
                          env=clean_env())
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "processed" in proc.stderr
    assert not (tmp_path / "state" / "model").exists()


def test_truncated_model_is_one_line(fitted, tmp_path):
    import shutil

    paths, _ = fitted
    broken = tmp_path / "model"
    shutil.copytree(paths.model, broken)
    data = (broken / "alpha.npy").read_bytes()
    (broken / "alpha.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cannot load the model") as err:
        load_model(broken)
    assert "\n" not in str(err.value)


def test_user_support_sample(stage_params):
    ds = load_dataset(stage_params.paths().processed)
    model, report = fit_dataset(ds, user_support=0.5, lambdas=[1, 5], select_metric="hr@100")
    assert report["support"]["kind"] == "user_sample"
    assert model.support.shape[0] == round(0.5 * ds.n_users)


@pytest.mark.realdata
@pytest.mark.slow
def test_ml1m_reproduces_paper_figures(ml1m_path, tmp_path):
    """∞-AE on all ML-1M users, λ by validation HR@100 (the paper's rule): test nDCG@10 / HR@10
    within 0.5 of the reference (33.39 / 31.91)."""
    from tasks.ingest import ingest

    ingest(ml1m_path, tmp_path / "ml1m")
    model, report = fit_dataset(load_dataset(tmp_path / "ml1m"), select_metric="hr@100")
    test = report["metrics"]["test"]
    assert report["metrics"]["lambda"] == 5.0
    assert abs(test["ndcg@10"] - 33.39) <= 0.5, test
    assert abs(test["hr@10"] - 31.91) <= 0.5, test


def test_a_large_log_reference_fits_on_the_validation_sample_users(stage_params):
    """Past evaluate.reference_max_users the reference ∞-AE is fitted on the validation sample's
    own users (when it fits): their validation scores are X − λ̃α, the same figures as scoring
    them through the cross kernel, and every model is scored on that same sample."""
    from models.infinite_ae import fit_select
    from models.kernels import NTKConfig
    from tasks.evaluate import reference_metrics

    ds = load_dataset(stage_params.paths().processed)
    ref = reference_metrics(ds, max_users=150, lambdas=[1.0, 5.0], select_metric="ndcg@10",
                            eval_max_users=120, sample_seed=0)
    assert ref["description"].startswith("∞-AE on the 120 users of the validation sample")
    val = ds.val_set(120, 0)
    support = ds.train[val.rows].toarray()
    _, slow = fit_select(support, val, [1.0, 5.0], NTKConfig(), select_metric="ndcg@10")
    kept = next(p for p in slow if p.lam == ref["lambda"])
    assert ref["val"]["ndcg@10"] == pytest.approx(kept.val["ndcg@10"], abs=1e-6)
