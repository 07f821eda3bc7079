"""The pyfunc wrapper on a small fitted model (no MLflow server, no registry)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="module")
def wrapped(tmp_path_factory):
    from infrec.pyfunc_model import InfAEPyfunc
    from tasks.data import load_dataset
    from tasks.fit import fit_dataset, save_model
    from tasks.ingest import ingest
    from tasks.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("pyfunc")
    write_synthetic(root / "raw.csv", n_users=120, n_items=150, seed=1)
    ingest(root / "raw.csv", root / "data")
    ds = load_dataset(root / "data")
    model, report = fit_dataset(ds, lambdas=[1.0])
    save_model(model, root / "model", ds.item_ids, report, ds.data_version)
    return InfAEPyfunc().load_dir(str(root / "model")), model, ds


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


def test_input_shapes_and_edge_cases(wrapped):
    py, _, ds = wrapped
    h = [int(ds.item_ids[3])]
    from_dict = py.predict(None, {"history": [h, []], "k": [2, 3]})
    from_list = py.predict(None, [h])
    assert [len(x) for x in from_dict["items"]] == [2, 3]
    assert from_list["items"][0][:2] == from_dict["items"][0]
    everything = [int(x) for x in ds.item_ids]
    full = py.predict(None, pd.DataFrame({"history": [everything[:-2]], "k": [10]}))
    assert sorted(full["items"][0]) == sorted(everything[-2:])  # only unseen items come back
    assert py.predict(None, pd.DataFrame({"history": []})).empty


def test_signature_declares_history_and_optional_k():
    from infrec.pyfunc_model import signature

    sig = signature()
    assert sig.inputs.input_names() == ["history", "k"]
    assert [c.required for c in sig.inputs.inputs] == [True, False]
    assert sig.outputs.input_names() == ["items", "scores", "unknown"]
