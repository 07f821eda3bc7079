"""The served model (tasks.serving) on a small fitted model: raw ids in and out, both input forms,
bounded, validated requests, the low-latency scorer against the model's own scores, and — once,
over REST from `mlflow models serve` of a temporary registry — the served answers against
`infrec recommend` and the 4xx of malformed requests."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from tasks.serving import InfAEPyfunc, RequestError, parse_rows, signature

LIMITS = {"max_k": 50, "max_history": 40, "max_batch": 5}


import os  # noqa: E402


def _model_dir(wrapped) -> str:
    return wrapped[0].model_dir


@pytest.fixture(scope="module")
def wrapped(tmp_path_factory):
    from tasks.data import load_dataset
    from tasks.fit import fit_dataset
    from tasks.ingest import ingest
    from tasks.model_store import save_model
    from tasks.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("pyfunc")
    write_synthetic(root / "raw.csv", n_users=120, n_items=150, seed=1)
    ingest(root / "raw.csv", root / "data")
    ds = load_dataset(root / "data")
    model, report = fit_dataset(ds, lambdas=[1.0], select_metric="hr@100")
    save_model(model, root / "model", ds.item_ids, report, ds.data_version)
    py = InfAEPyfunc().load_dir(str(root / "model"), LIMITS)
    py.model_dir = str(root / "model")
    return py, model, ds


def test_matches_the_model_in_raw_ids_and_excludes_seen(wrapped):
    py, model, ds = wrapped
    row = ds.train[5]
    history = [int(x) for x in ds.item_ids[row.indices]]
    out = py.predict(None, pd.DataFrame({"history": [history], "k": [7]}))
    top, scores = model.recommend(row, 7)
    assert out["items"][0] == [int(x) for x in ds.item_ids[top[0]]]
    assert np.allclose(out["scores"][0], scores[0])
    assert not set(out["items"][0]) & set(history)
    assert out["unknown"][0] == []


def test_unknown_ids_are_ignored_and_reported(wrapped):
    py, _, ds = wrapped
    known = [int(ds.item_ids[0]), int(ds.item_ids[1])]
    a = py.predict(None, pd.DataFrame({"history": [known]}))
    b = py.predict(None, pd.DataFrame({"history": [known + [-5, 10**12, known[0]]]}))
    assert a["items"][0] == b["items"][0] and len(a["items"][0]) == 10  # k defaults to 10
    assert b["unknown"][0] == ["-5", str(10**12)]


def test_input_forms(wrapped):
    py, _, ds = wrapped
    h = [int(ds.item_ids[3])]
    records = py.predict(None, pd.DataFrame.from_records([{"history": h, "k": 2},
                                                          {"history": h, "k": 3}]))
    columns = py.predict(None, {"history": [h, h], "k": [2, 3]})
    listed = py.predict(None, [h])
    assert [len(x) for x in records["items"]] == [2, 3] == [len(x) for x in columns["items"]]
    assert listed["items"][0][:2] == records["items"][0]
    everything = [int(x) for x in ds.item_ids][:LIMITS["max_history"]]
    full = py.predict(None, pd.DataFrame({"history": [everything], "k": [50]}))
    assert not set(full["items"][0]) & set(everything)  # only unseen items come back


@pytest.mark.parametrize(
    "request_, message",
    [
        ({"history": [[1, 2]], "k": [0]}, "k must be between 1 and 50"),
        ({"history": [[1, 2]], "k": [-5]}, "k must be between 1 and 50"),
        ({"history": [[1, 2]], "k": [51]}, "k must be between 1 and 50"),
        ({"history": [[]]}, "empty history"),
        ({"history": []}, "no rows"),
        ({"history": [["a", 2]]}, "expected an integer"),
        ({"history": [[1.5]]}, "expected an integer"),
        ({"history": [[True]]}, "boolean"),
        ({"history": [[99999999999999999999999]]}, "64-bit"),
        ({"history": [list(range(41))]}, "at most 40"),
        ({"history": [[1]] * 6}, "at most 5 per request"),
        ({"history": ["1,2"]}, "must be a list"),
        ({"history": [[1]], "k": [1, 2]}, "'k' has 2 values"),
        ({"items": [[1]]}, "'history' field"),
        ({"history": [[4], [1, 2]]}, "row 1: none of its 2 item id.s. is known to this model"),
    ],
)
def test_bad_requests_are_refused_without_echoing_the_input(wrapped, request_, message):
    py, _, ds = wrapped
    if "known to this model" in message:  # a valid request of ids of another catalogue
        request_ = {"history": [[int(ds.item_ids[0])], [1, 2]]}
        assert not {1, 2} & set(ds.item_ids.tolist())
        with pytest.raises(RequestError, match=message) as err:
            py.recommend(*parse_rows(request_, LIMITS))
    else:
        with pytest.raises(RequestError, match=message) as err:
            parse_rows(request_, LIMITS)
    assert len(str(err.value)) < 200
    with pytest.raises(MlflowException) as served:  # what the REST server turns into a 400
        py.predict(None, request_)
    assert served.value.error_code == "INVALID_PARAMETER_VALUE"


def test_signature_declares_history_and_optional_k():
    sig = signature()
    assert sig.inputs.input_names() == ["history", "k"]
    assert [c.required for c in sig.inputs.inputs] == [True, False]
    assert sig.outputs.input_names() == ["items", "scores", "unknown"]


def test_row_scorer_equals_the_model_scores(wrapped):
    """Both paths of the served scorer (NumPy for a few rows, the jitted kernel on padded rows
    for a batch) give the model's scores up to float32 rounding."""
    import scipy.sparse as sp

    from models.infinite_ae import SMALL_ROWS

    _, model, ds = wrapped
    scorer = model.row_scorer(64)
    scorer.warm()
    users = np.flatnonzero(np.diff(ds.train.indptr))  # (served rows are never empty)
    for rows in (1, 3, SMALL_ROWS + 1, 40):
        h = sp.csr_matrix(ds.train[users[:rows]], dtype=np.float32)
        h.data[:] = 1.0
        got = scorer.scores(h.indptr, h.indices)
        assert got.shape == (rows, model.n_items) and got.dtype == np.float32
        want = model.scores(h)  # float32 kernels (NumPy's and XLA's arctan2) differ in ulps
        assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max(), rows


def test_served_lists_equal_the_dataframe_and_single_rows(wrapped):
    """Under the server (plain lists) a batch bigger than a chunk answers as the DataFrame does
    and as each history asked alone."""
    from tasks import serving

    py, _, ds = wrapped
    n = serving.CHUNK_ROWS + 20
    served = InfAEPyfunc().use(py.model, py.item_ids, py.info,
                               {**LIMITS, "max_batch": n, "max_history": 1000})
    served.served = True
    histories = [[int(x) for x in ds.item_ids[ds.train[r % ds.train.shape[0]].indices]] or
                 [int(ds.item_ids[0])] for r in range(n)]
    ks = [1 + r % 12 for r in range(n)]
    rows = served.predict(None, {"history": histories, "k": ks})
    frame = InfAEPyfunc().use(py.model, py.item_ids, py.info, {**LIMITS, "max_history": 1000}
                              ).predict(None, pd.DataFrame({"history": histories[:5], "k": ks[:5]}))
    assert isinstance(rows, list) and len(rows) == n
    assert [r["items"] for r in rows[:5]] == [list(x) for x in frame["items"]]
    for r in (0, 7, serving.CHUNK_ROWS + 3, n - 1):
        alone = served.predict(None, {"history": [histories[r]], "k": [ks[r]]})[0]
        assert rows[r]["items"] == alone["items"] and len(alone["items"]) == ks[r]
        assert np.allclose(rows[r]["scores"], alone["scores"], rtol=1e-4, atol=1e-5)


def test_rest_answers_equal_infrec_recommend_and_malformed_requests_are_4xx(
        wrapped, tmp_path, monkeypatch):
    import json
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    import mlflow
    from typer.testing import CliRunner

    from infrec.cli import app
    from tasks.register import log_pyfunc
    from tests.helpers import free_port, post_json, stop_group

    py, _, ds = wrapped
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("serve", artifact_location=str(tmp_path / "artifacts"))
    model_dir = _model_dir(wrapped)
    limits = {"max_k": 50, "max_history": 400, "max_batch": 100}
    with mlflow.start_run(experiment_id=exp):
        info = log_pyfunc(model_dir, limits, pd.DataFrame({"history": [[int(ds.item_ids[0])]],
                                                           "k": [5]}))
    client = mlflow.MlflowClient()
    version = mlflow.register_model(info.model_uri, "infrec-infae").version
    client.set_registered_model_alias("infrec-infae", "champion", version)

    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/infrec-infae@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "MLFLOW_TRACKING_URI": uri}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    histories = [[int(x) for x in ds.item_ids[ds.train[r].indices]] + [999_999_999]
                 for r in (2, 9, 17)]
    url = f"http://127.0.0.1:{port}/invocations"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "server not ready in 180 s"
                time.sleep(0.5)
        batch = post_json(url, {"dataframe_records": [{"history": h, "k": 7} for h in histories]})
        alone = post_json(url, {"inputs": [{"history": histories[1], "k": 7}]})
        refused = {}
        for name, body in {
            "k-0": {"dataframe_records": [{"history": histories[0], "k": 0}]},
            "text-ids": {"inputs": [{"history": ["a", "b"], "k": 5}]},
            "other-catalogue": {"dataframe_records": [{"history": [1, 2], "k": 5}]},
            "too-many-rows": {"dataframe_records": [{"history": [1]}] * 101},
            "not-json": "{history",
        }.items():
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            req = urllib.request.Request(url, data=data,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    refused[name] = resp.status
            except urllib.error.HTTPError as err:
                refused[name] = err.code
    finally:
        stop_group(proc)
        log.close()
    assert {name: status // 100 for name, status in refused.items()} == dict.fromkeys(refused, 4)
    runner = CliRunner()
    for h, served in zip(histories, batch["predictions"]):
        cli = runner.invoke(app, ["recommend", "--history", ",".join(map(str, h)), "-k", "7",
                                  "--json"])
        assert cli.exit_code == 0, cli.output
        rec = json.loads(cli.stdout)
        assert served["items"] == rec["items"] and len(rec["items"]) == 7
        assert np.allclose(served["scores"], rec["scores"], rtol=1e-5)
        assert served["unknown"] == rec["unknown"] == ["999999999"]
    assert alone["predictions"][0]["items"] == batch["predictions"][1]["items"]  # (BLAS: GEMV
    assert np.allclose(alone["predictions"][0]["scores"],  # and GEMM round differently)
                       batch["predictions"][1]["scores"], rtol=1e-5)
