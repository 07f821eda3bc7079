"""The served model (tasks.serving) on a small fitted model: raw ids in and out, both input forms,
and bounded, validated requests (no MLflow server, no registry)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from tasks.serving import InfAEPyfunc, RequestError, parse_rows, signature

LIMITS = {"max_k": 50, "max_history": 40, "max_batch": 5}


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
    model, report = fit_dataset(ds, lambdas=[1.0])
    save_model(model, root / "model", ds.item_ids, report, ds.data_version)
    return InfAEPyfunc().load_dir(str(root / "model"), LIMITS), model, ds


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
