"""A user's own log, versioned on every run, and a rollback that can be trusted — walked the way
the README tells a user: the `infrec` CLI in a real temporary git + DVC workspace with a real
local DVC remote, MLflow on SQLite in the workspace (MLflow's default place), a real Prefect
server; the log file at a fixed path outside the workspace, growing between runs.

Two stories share their workspaces across the tests of this module, in order: a daily log named
by ``ingest.input`` (``story``), and the same log given as ``infrec run --input`` (``spelt``)."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from tasks import registry
from tasks.params import set_in_file
from tests.helpers import (BIN, STRICT_GATES, clone_workspace, last_json, make_workspace,
                           post_json, prefect_server, write_log)

pytestmark = pytest.mark.slow
MODEL = "infrec-infae"
DATA = ".infrec/data"


@pytest.fixture(scope="module")
def api_url(tmp_path_factory):
    with prefect_server(tmp_path_factory.mktemp("versions-prefect")) as url:
        yield url


def _snapshot(ws) -> dict[str, bytes]:
    return {**ws.tree(f"{DATA}/input"), **ws.tree(f"{DATA}/processed"),
            **ws.tree(f"{DATA}/summary.parquet"), **ws.tree("dvc.lock"), **ws.tree("reports")}


def _versions(ws, cli: bool = False) -> list[dict]:
    """`infrec versions --json` (``cli``), or the same table read in this process."""
    if cli:
        return json.loads(ws.infrec("versions", "--json").stdout)
    import os

    from tasks.params import load_params
    from tasks.rollback import versions_table

    cwd, before = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = ws.tracking_uri
    os.chdir(ws.root)
    try:
        rows = versions_table(load_params(ws.root / "params.yaml"))
    finally:
        os.chdir(cwd)
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
    return [{k: v for k, v in r.items() if k != "info"} for r in rows]


class Story:
    """A daily log: day 1 → v1, day 2 (more rows) → v2, day 3 (same content) → no version."""

    def __init__(self, root, api_url, spelling):
        self.log = write_log(root / "logs" / "ratings.csv", users=400)
        if spelling == "ingest.input":
            self.ws = make_workspace(root, api_url, ingest={"input": str(self.log)})
            self.run_args = ("run",)
        else:  # `git clone --no-tags --single-branch` of the project: its committed dvc.lock
            self.ws = clone_workspace(root, api_url)
            self.run_args = ("run", "--input", str(self.log))
        self.day1 = self.ws.infrec(*self.run_args)
        self.v1, self.v1_log = _snapshot(self.ws), self.log.read_bytes()
        self.v1_params = (self.ws.root / "params.yaml").read_text()
        write_log(self.log, users=400, extra_rows=150)
        if spelling == "--input":  # the user also edits params between the days
            set_in_file(self.ws.root / "params.yaml", "evaluate.ease_lambdas", [10.0, 100.0, 500.0])
            set_in_file(self.ws.root / "params.yaml", "gates.champion_epsilon", 50.0)
        self.day2 = self.ws.infrec(*self.run_args)
        self.v2 = _snapshot(self.ws)


@pytest.fixture(scope="module")
def story(tmp_path_factory, api_url):
    return Story(tmp_path_factory.mktemp("story"), api_url, "ingest.input")


@pytest.fixture(scope="module")
def spelt(tmp_path_factory, api_url):
    return Story(tmp_path_factory.mktemp("spelt"), api_url, "--input")


def test_each_changed_log_is_a_new_version_and_unchanged_content_makes_none(story):
    ws = story.ws
    assert "data v1" in story.day1.stdout and "PROMOTED" in story.day1.stdout
    assert "data v2" in story.day2.stdout and story.v2 != story.v1
    assert ws.tree(f"{DATA}/input") == {f"{DATA}/input/ratings.csv": story.log.read_bytes()}
    t0 = time.monotonic()
    same = ws.infrec(*story.run_args)
    took = time.monotonic() - t0
    assert "data v2" in same.stdout or "unchanged" in same.stdout  # no new data version
    if registry.git_commit().endswith("+dirty"):  # uncommitted code: a candidate of its own
        assert "registered: infrec-infae version 3" in same.stdout
    else:  # same input, data, summary, params and clean code as v2: decided before any stage
        assert "unchanged" in same.stdout and "nothing registered" in same.stdout
        assert "equal infrec-infae version 2" in same.stdout, same.stdout
        seconds = next(ln for ln in same.stdout.splitlines() if ln.startswith("seconds:"))
        assert "unchanged-check" in seconds and "distill" not in seconds, seconds
        print(f"unchanged run: {took:.1f} s ({seconds})")  # the "in seconds" goal: measured
    versions = _versions(ws, cli=True)
    assert [v["version"] for v in versions] == ["v1", "v2"]
    assert [m["version"] for m in versions[0]["model_versions"]] == ["1"]
    assert versions[1]["champion"] and versions[1]["input"]["name"] == "ratings.csv"
    assert versions[0]["input"]["sha256"] != versions[1]["input"]["sha256"]
    # the log grew over the same items: the same catalogue (a fingerprint of the item ids)
    assert len(versions[0]["catalogue"]) == 12 and versions[1]["catalogue"] == versions[0]["catalogue"]
    assert ws.version_tags("1")["catalogue"] == versions[0]["catalogue"]
    assert "up to date" in ws.dvc("status").lower()


def test_both_spellings_give_the_same_versions(story, spelt):
    a, b = _versions(story.ws), _versions(spelt.ws)
    assert [v["hashes"] for v in a] == [v["hashes"] for v in b]
    assert str(spelt.log) in (spelt.ws.root / "params.yaml").read_text()  # DVC's record reads it


def test_kill_9_during_rollback_leaves_one_consistent_version(story):
    """SIGKILL of `infrec rollback` midway through the restore, midway through swapping the
    files in, before and during the alias moves: the next writer finds data, dvc.lock, reports
    and aliases all at the old version and no restore folder."""
    ws = story.ws
    before, aliases = _snapshot(ws), ws.aliases()
    for moment in ("rollback-fetch", "rollback-checkout-midway", "rollback-aliases",
                   "alias-move"):
        killed = ws.infrec("rollback", "v1", check=False, env=ws.env(INFREC_FAULT=moment))
        assert killed.returncode == -signal.SIGKILL, (moment, killed.stderr[-2000:])
        ws.infrec("promote", aliases["champion"], check=False)  # the next writer recovers
        assert _snapshot(ws) == before, moment
        assert ws.aliases() == aliases, moment
        assert not list((ws.root / ".infrec").glob(".restore-*")), moment
        assert not (ws.root / ".infrec" / "rollback.journal.json").exists(), moment
    assert "up to date" in ws.dvc("status").lower()


def test_rollback_restores_v1_exactly_with_its_gate_passed_model(story):
    ws = story.ws
    back = ws.infrec("rollback", "v1", "--reason", "bad import on day 2")
    assert "rolled back to data v1" in back.stdout
    assert "champion is now infrec-infae version 1" in back.stdout
    assert _snapshot(ws) == story.v1  # input snapshot, processed data, summary, lock, reports
    assert story.log.read_bytes() != story.v1_log  # the user's own log was not touched
    tags = ws.version_tags("1")
    assert tags["data_version"] == "v1" and tags["gate.passed"] == "true"
    assert ws.aliases()["champion"] == "1"
    # the log kept day 2's rows: DVC shows exactly that (the ingest stage's link to the log)
    assert f"{story.log} has changed since v1" in back.stdout, back.stdout
    status = ws.dvc("status")
    assert "ingest:" in status and ".infrec/log" in status and "fit:" not in status, status
    assert not list(ws.root.glob(".infrec-restore-*"))
    table = ws.infrec("lineage").stdout  # a plain UTF-8 table by default …
    assert "data version" in table and "v1" in table and "\\u" not in table
    assert "PASS evidence" in table and "≥" in table and not table.lstrip().startswith("{")
    lineage = json.loads(ws.infrec("lineage", "--json").stdout)  # … JSON on request
    assert lineage["version"] == "1" and lineage["data_version"] == "v1"
    assert lineage["input"]["sha256"] == _versions(ws)[0]["input"]["sha256"]
    for key in ("summary_hash", "params_hash", "git_commit", "prefect_flow_run_id",
                "mlflow_run_id"):
        assert lineage[key], key
    assert lineage["gate"]["passed"] == "true"


def test_the_walk_on_a_no_tags_single_branch_clone(spelt, tmp_path):
    """On a `git clone --no-tags --single-branch` of the project (its committed dvc.lock), two
    `--input` runs over a changed log outside the repo (params edited between them): rollback to
    v1 gives v1's bytes, v1's params.yaml values, a gate-passed champion trained on v1, and
    `dvc status` tells the truth about the user's log — the log moved on since v1 (ingest
    changed, said by the rollback), v1's bytes again (up to date), a grown log (ingest changed).
    Then a log of other items is judged without the old champion, and a history of the old
    catalogue's items is refused."""
    import yaml

    ws = spelt.ws
    back = ws.infrec("rollback", "v1")
    assert _snapshot(ws) == spelt.v1  # input snapshot, processed data, summary, lock, reports
    assert ws.aliases()["champion"] == "1" and ws.version_tags("1")["gate.passed"] == "true"
    assert ws.version_tags("1")["data_version"] == "v1"
    # v1's params: what the day-2 edit changed is back (comments and layout kept)
    assert "params.yaml: 2 key(s) restored to v1's values" in back.stdout, back.stdout
    restored = yaml.safe_load((ws.root / "params.yaml").read_text())
    assert restored == yaml.safe_load(spelt.v1_params)
    # the user's log still holds day 2's rows: the rollback says so, and so does DVC (only the
    # ingest stage's dependency on the log differs; params and data are v1's)
    assert f"{spelt.log} has changed since v1" in back.stdout, back.stdout
    status = ws.dvc("status")
    assert "ingest:" in status and ".infrec/log" in status and "params.yaml" not in status
    assert "distill:" not in status and "fit:" not in status, status
    spelt.log.write_bytes(spelt.v1_log)  # the user takes day 2's bad rows out again
    assert "up to date" in ws.dvc("status").lower()
    with spelt.log.open("a") as fh:  # the next day's rows arrive
        fh.write("1,3,5.0,1200000000\n")
    status = ws.dvc("status")
    assert "ingest:" in status and "modified:" in status and ".infrec/log" in status, status
    # another log, other items: judged without the old champion, which then answers nothing
    old_items = sorted({int(line.split(",")[1]) for line in spelt.v1_log.decode().splitlines()[1:]})
    other = write_log(tmp_path / "other-shop.csv", users=300, item_offset=100_000)
    res = ws.infrec("run", "--input", str(other))
    assert "another catalogue" in res.stdout and "PROMOTED" in res.stdout, res.stdout[-3000:]
    refused = ws.infrec("recommend", "--history", ",".join(map(str, old_items[:5])), check=False)
    assert refused.returncode == 2 and "known to this model" in refused.stderr, refused.stderr


@pytest.mark.parametrize("name, text, says", [
    ("quote.csv", 'userId,movieId\n1,2\n3,"4\n5,6\n', "line 3: unclosed quote"),
    ("badid.csv", "userId,movieId\n1,2\n1,x\n", "line 3: column 'movieId': 'x' is not an"),
    ("header.csv", "usr,itm\n1,2\n", "expected column 'user_id' not found"),
    ("missing.csv", None, "input file not found"),
])
def test_a_bad_input_file_is_refused_first_and_changes_nothing(spelt, tmp_path, name, text, says):
    """`infrec run --input BAD` in a versioned workspace: the whole file is checked before
    params.yaml is touched or a flow run starts — one line naming the file (and line); git status,
    params.yaml, the registry and the data versions are as they were. The seconds it took are
    printed, not asserted (issue 24's "within 3 s" is a measured figure: a loaded CI machine
    must not fail it)."""
    ws = spelt.ws
    bad = tmp_path / name
    if text is not None:
        bad.write_text(text)
    before = (ws.git("status", "--porcelain"), (ws.root / "params.yaml").read_bytes(),
              ws.aliases(), len(ws.client().search_model_versions(f"name='{MODEL}'")),
              ws.git("tag", "--list", "data/*"))
    runs_before = post_json(f"{ws.api_url}/flow_runs/count", {})
    t0 = time.monotonic()
    res = ws.infrec("run", "--input", str(bad), check=False)
    print(f"{name}: refused in {time.monotonic() - t0:.2f}s")  # the ≤ 3 s goal: measured, shown
    assert res.returncode == 2 and res.stderr.strip() == res.stderr.strip().splitlines()[0]
    assert res.stderr.startswith(f"error: {bad}: ") and says in res.stderr, res.stderr
    # refused before any flow run was created (no Prefect work started)
    assert post_json(f"{ws.api_url}/flow_runs/count", {}) == runs_before
    assert (ws.git("status", "--porcelain"), (ws.root / "params.yaml").read_bytes(),
            ws.aliases(), len(ws.client().search_model_versions(f"name='{MODEL}'")),
            ws.git("tag", "--list", "data/*")) == before


def test_recommend_user_takes_history_from_the_champions_data(story):
    """The champion (trained on v1 after the rollback) answers `--user` from v1's data even
    when the workspace holds newer data (a rejected run on day 2's log)."""
    from tasks.data import load_dataset

    ws = story.ws
    v1_data = load_dataset(ws.root / DATA / "processed")
    strict = ws.write_params("strict.yaml", ingest={"input": str(story.log)}, gates=STRICT_GATES)
    ws.infrec("run", "--params", str(strict))
    assert ws.aliases()["champion"] == "1"
    now = load_dataset(ws.root / DATA / "processed")
    count = dict(zip(v1_data.user_ids.tolist(),
                     (v1_data.train + v1_data.val + v1_data.test).getnnz(axis=1).tolist()))
    count_now = dict(zip(now.user_ids.tolist(),
                         (now.train + now.val + now.test).getnnz(axis=1).tolist()))
    user = next(u for u in count if count_now.get(u, count[u]) != count[u])
    out = last_json(ws.infrec("recommend", "--user", str(user), "--json"))
    assert out["version"] == "1" and out["history_size"] == count[user]
    latest = registry.latest_version(ws.tracking_uri, MODEL)
    assert ws.version_tags(latest)["gate.passed"] == "false"  # judged by strict.yaml's gates


@pytest.fixture(scope="module")
def refusals(tmp_path_factory, api_url):
    root = tmp_path_factory.mktemp("refusals")
    log = write_log(root / "logs" / "ratings.csv", users=300)
    ws = make_workspace(root, api_url, ingest={"input": str(log)}, gates=STRICT_GATES)
    rejected = ws.infrec("run")
    write_log(log, users=300, extra_rows=100)
    lenient = ws.write_params("lenient.yaml", ingest={"input": str(log)})
    ws.infrec("run", "--params", str(lenient))
    return ws, rejected


def test_rollback_to_data_whose_models_all_failed_is_refused(refusals):
    ws, rejected = refusals
    assert "REJECTED" in rejected.stdout
    assert ws.aliases()["champion"] == "2" and ws.version_tags("1")["gate.passed"] == "false"
    before = _snapshot(ws), ws.aliases(), len(ws.client().search_model_versions(f"name='{MODEL}'"))
    # v1's only model failed its gates: rollback refits, gates it, and refuses — nothing changed
    refused = ws.infrec("rollback", "v1", check=False)
    assert refused.returncode == 2
    errors = [ln for ln in refused.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "refused" in errors[0] and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == errors[0]
    assert (_snapshot(ws), ws.aliases(),
            len(ws.client().search_model_versions(f"name='{MODEL}'"))) == before
    # the same through `infrec promote`: a failed version is not promoted without --force
    assert ws.infrec("promote", "1", check=False).returncode == 1
    assert ws.aliases()["champion"] == "2"


def test_rollback_waits_for_the_writer_lock_and_fails_cleanly(refusals):
    ws, _ = refusals
    before = _snapshot(ws), ws.aliases()
    holder = subprocess.Popen(
        [str(BIN / "python"), "-c",
         "import time; from tasks.concurrency import writer_lock; "
         "from tasks.params import load_params; cm = writer_lock(load_params('params.yaml')); "
         "cm.__enter__(); print('held', flush=True); time.sleep(120)"],
        cwd=ws.root, env=ws.env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        res = ws.infrec("rollback", "v1", "--force", "--reason", "x", "--wait", "3", check=False)
        assert res.returncode == 2 and time.monotonic() - t0 >= 3
        assert "writer lock" in res.stderr and res.stderr.strip().count("\n") == 0
        assert (_snapshot(ws), ws.aliases()) == before
        holder.send_signal(signal.SIGKILL)  # a killed holder's lock is released at once
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()


def test_forced_rollback_is_recorded(refusals):
    ws, _ = refusals
    forced = ws.infrec("rollback", "v1", "--force", "--reason", "known good day", "--wait", "60")
    champion = ws.aliases()["champion"]
    tags = ws.version_tags(champion)
    assert tags["refit"] == "rollback to v1" and tags["data_version"] == "v1"
    assert tags["promotion.reason"] == "known good day" and tags["promotion.forced_by"]
    assert tags["gate.passed"] == "false" and "FORCED" in forced.stdout
    event = json.loads((ws.root / ".infrec" / "version_log.jsonl").read_text().splitlines()[-1])
    assert event["reason"] == "known good day" and event["forced"]


def test_small_log_caps_the_budget_and_runs_end_to_end(refusals, tmp_path):
    ws, _ = refusals
    log = write_log(tmp_path / "tiny.csv", users=40, items=120)
    big = ws.write_params("big-budget.yaml", distill={"budget": 500})
    res = ws.infrec("run", "--input", str(log), "--params", str(big))
    assert "capped at" in res.stderr + res.stdout
    report = json.loads((ws.root / "reports" / "distill.json").read_text())
    assert report["budget_requested"] == 500 and report["budget"] <= 40
    # the new data version records the params actually used (--input and --params big.yaml) …
    newest = _versions(ws)[-1]
    record = json.loads(ws.git("show", f"refs/tags/data/{newest['version']}:version.json"))
    assert record["info"]["params"]["distill"]["budget"] == 500
    assert record["info"]["params"]["ingest"]["input"] == str(log)
    assert record["info"]["input"]["name"] == "tiny.csv"
    # … and so does dvc.lock, so DVC tells the truth: params.yaml is not what produced them
    lock = ws.git("show", f"refs/tags/data/{newest['version']}:dvc.lock")
    assert "budget: 500" in lock and str(log) in lock
    assert "budget: 500" in (ws.root / "dvc.lock").read_text()
    status = ws.dvc("status")
    assert "params.yaml" in status and "modified:           distill" in status


def test_the_same_bytes_at_another_path_make_no_version_and_register_nothing(refusals, tmp_path):
    """v1's log (rejected by params.yaml's strict gates) copied under another name: the run
    finds v1's content — no new data version — and a model equal to one already judged on it —
    nothing registered, the verdict not asked again; the champion does not move."""
    ws, _ = refusals
    copy = write_log(tmp_path / "elsewhere" / "day-one.csv", users=300)  # v1's bytes
    client = ws.client()
    before = (ws.git("tag", "--list", "data/*"),
              len(client.search_model_versions(f"name='{MODEL}'")), ws.aliases())
    res = ws.infrec("run", "--input", str(copy))
    assert "data v1" in res.stdout, res.stdout[-2000:]
    assert ws.git("tag", "--list", "data/*") == before[0]
    assert "up to date" in ws.dvc("status").lower()  # dvc.lock names the file this run read
    if registry.git_commit().endswith("+dirty"):  # uncommitted code: a candidate of its own
        return
    assert "unchanged" in res.stdout and "nothing registered" in res.stdout, res.stdout[-2000:]
    assert "rejected" in res.stdout  # it says which version it equals, and that one's verdict
    assert (len(client.search_model_versions(f"name='{MODEL}'")), ws.aliases()) == before[1:]
