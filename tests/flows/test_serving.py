"""Serving: the registered pyfunc in a new process, the `recommend` CLI, and the REST server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.flows.conftest import MODEL_NAME
from tests.helpers import free_port, post_json, stop_group

pytestmark = pytest.mark.slow

LOAD_AND_PREDICT = """
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.DataFrame({"history": [json.loads(sys.argv[2])], "k": [10]}))
print(json.dumps({"items": [int(x) for x in out["items"][0]],
                  "scores": [float(x) for x in out["scores"][0]],
                  "unknown": [str(x) for x in out["unknown"][0]]}))
"""


def _history(flow_env) -> list[int]:
    """A user's train items (raw ids) from the ingested data, plus an id no model knows."""
    from tasks.data import load_dataset

    ds = load_dataset(flow_env.state_dir / "data" / "processed")
    return [int(x) for x in ds.item_ids[ds.train[3].indices]] + [999_999_999]


def test_pyfunc_in_new_process_matches_recommend_cli(two_runs, flow_env):
    history = _history(flow_env)
    env = flow_env.subprocess_env()
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, f"models:/{MODEL_NAME}@champion",
         json.dumps(history)],
        env=env, capture_output=True, text=True, timeout=180, check=True,
    )
    pyfunc = json.loads(loaded.stdout.strip().splitlines()[-1])
    cli = subprocess.run(
        [str(os.path.join(os.path.dirname(sys.executable), "infrec")), "recommend",
         "--history", ",".join(map(str, history)), "-k", "10", "--json"],
        env=env, capture_output=True, text=True, timeout=180, cwd=flow_env.root, check=True,
    )
    rec = json.loads(cli.stdout)
    assert len(pyfunc["items"]) == 10
    assert rec["items"] == pyfunc["items"]
    assert np.allclose(rec["scores"], pyfunc["scores"])
    assert pyfunc["unknown"] == ["999999999"] == rec["unknown"]
    assert not set(pyfunc["items"]) & set(history)  # seen items are excluded
    assert "oneDNN" not in cli.stderr and "Traceback" not in cli.stderr


def test_recommend_table_and_user_forms(two_runs, flow_env, restore_environ):
    from typer.testing import CliRunner

    from infrec.cli import app
    from tasks.data import load_dataset

    history = _history(flow_env)
    runner = CliRunner()
    as_json = json.loads(runner.invoke(app, ["recommend", "--history", ",".join(map(str, history)),
                                             "--json"]).stdout)
    table = runner.invoke(app, ["recommend", "--history", ",".join(map(str, history))])
    assert table.exit_code == 0, table.output
    rows = [line.split("\t") for line in table.stdout.splitlines() if line[:1].isdigit()]
    assert [int(r[1]) for r in rows] == as_json["items"]
    assert "999999999" in table.stderr
    ds = load_dataset(flow_env.state_dir / "data" / "processed")
    params = str(flow_env.params_file("recommend.yaml"))  # where the state is (its state_dir)
    user = runner.invoke(app, ["recommend", "--user", str(ds.user_ids[3]), "-k", "4", "--json",
                               "--params", params])
    assert user.exit_code == 0, user.output
    out = json.loads(user.stdout)
    known = set(int(x) for x in ds.item_ids[(ds.train[3] + ds.val[3] + ds.test[3]).indices])
    assert len(out["items"]) == 4 and out["history_size"] == len(known)
    assert not set(out["items"]) & known
    bad = runner.invoke(app, ["recommend", "--user", "123456789", "--params", params])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: --user 123456789: not a user")
    both = runner.invoke(app, ["recommend", "--user", "1", "--history", "1"])
    assert both.exit_code == 2 and "exactly one" in both.stderr
    other = runner.invoke(app, ["recommend", "--history", "1,2"])  # no item it knows
    assert other.exit_code == 2 and other.stderr.startswith(
        "error: --history: none of its 2 item id(s) is known to this model"), other.output


# over REST, as a client sends them (serving limits: max_k 1000, max_history 10000)
BAD_REQUESTS = {
    "k-0": {"dataframe_records": [{"history": [1, 2], "k": 0}]},
    "k-negative": {"dataframe_records": [{"history": [1, 2], "k": -5}]},
    "k-huge": {"dataframe_records": [{"history": [1, 2], "k": 10**6}]},
    "empty-history": {"dataframe_records": [{"history": [], "k": 5}]},
    "text-ids": {"inputs": [{"history": ["a", "b"], "k": 5}]},
    "1m-id-history": {"dataframe_records": [{"history": list(range(1_000_000)), "k": 5}]},
    "no-history-field": {"dataframe_records": [{"items": [1, 2]}]},
    "other-catalogue": {"dataframe_records": [{"history": [1, 2], "k": 5}]},  # ids it never saw
}
BAD_REQUESTS_SAY = {"k-0": "k must be between 1 and", "k-negative": "k must be between 1 and",
                    "k-huge": "k must be between 1 and", "empty-history": "empty history",
                    "text-ids": "", "1m-id-history": "at most 10000",
                    "no-history-field": "history", "other-catalogue": "known to this model"}


def _refusal(url: str, payload: dict) -> tuple[int, str]:
    """(HTTP status, body) of a request the server should refuse."""
    req = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def test_rest_serving_round_trip(two_runs, flow_env, tmp_path):
    import mlflow
    import pandas as pd

    history = _history(flow_env)
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL_NAME}@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=flow_env.subprocess_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                tail = (tmp_path / "serve.log").read_text()[-2000:]
                pytest.fail(f"server exited ({proc.returncode}): {tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail("server not ready in 120 s")
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/invocations"
        split = post_json(url, {"dataframe_split": {"columns": ["history", "k"],
                                                "data": [[history, 5], [history[:1], 3]]}})
        records = post_json(url, {"dataframe_records": [{"history": history[:3]}]})
        refused = {name: _refusal(url, payload) for name, payload in BAD_REQUESTS.items()}
    finally:
        stop_group(proc)
        log.close()

    mlflow.set_tracking_uri(flow_env.tracking_uri)
    local = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion").predict(
        pd.DataFrame({"history": [history, history[:1]], "k": [5, 3]})
    )
    preds = split["predictions"]
    assert [p["items"] for p in preds] == [list(map(int, x)) for x in local["items"]]
    assert len(preds[0]["items"]) == 5 and len(preds[1]["items"]) == 3
    assert preds[0]["unknown"] == ["999999999"] and preds[1]["unknown"] == []
    assert not set(preds[1]["items"]) & set(history[:1])
    assert not set(preds[0]["items"]) & set(history)
    assert len(records["predictions"][0]["items"]) == 10  # k defaults to 10
    for name, (status, body) in refused.items():  # a 400 naming the problem, input not echoed
        assert status == 400 and len(body) < 1000, (name, status, body[:300])
        assert BAD_REQUESTS_SAY[name] in body, (name, body)
    with pytest.raises(OSError):  # the server is gone
        urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
