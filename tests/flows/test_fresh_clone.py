"""First contact, as a new user meets infrec: a fresh clone of the committed project, `make run`,
then git, DVC and the DVC experiment commands, the README's serve and curl lines, and the
model loaded where the checkout is out of reach — exactly as the README says.

The clone uses this checkout's virtualenv (linked, so nothing is reinstalled) and its own code
(PYTHONPATH). One `make run` serves every test of the module."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, clean_env, free_port, post_json, sh, stop_group

pytestmark = pytest.mark.slow


class Clone:
    def __init__(self, root: Path):
        self.root = root

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(PYTHONPATH=str(self.root), **extra)

    def run(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), cwd=self.root, env=self.env(), capture_output=True,
                              text=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, (f"{args} → {proc.returncode}\n{proc.stdout[-3000:]}\n"
                                          f"{proc.stderr[-4000:]}")
        return proc


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """`git clone` of HEAD, its .venv linked to this checkout's, then `make run`."""
    root = tmp_path_factory.mktemp("fresh") / "infrec"
    sh(REPO, "git", "clone", "-q", str(REPO), str(root))
    os.symlink(REPO / ".venv", root / ".venv")
    # the venv is installed already: keep make from reinstalling it into the linked folder
    for name in ("requirements.lock", "pyproject.toml", "Makefile"):
        os.utime(root / name, (946684800, 946684800))
    c = Clone(root)
    c.make_run = c.run("make", "run", timeout=2400)  # minutes idle; a shared 2-core machine is slower
    yield c
    shutil.rmtree(root / ".infrec", ignore_errors=True)


def test_make_run_prints_a_readable_summary(clone):
    out = clone.make_run.stdout
    for line in ("registered: infrec-infae version 1", "candidate test:", "gates (ndcg@10):",
                 "PASS baselines", "champion:"):
        assert line in out, out[-3000:]


RUN_OUTPUTS = ("dvc.lock", "reports/")  # what `make run` writes among the committed files


def _changed(clone) -> list[str]:
    return [ln[3:] for ln in clone.run("git", "status", "--porcelain",
                                       "--untracked-files=all").stdout.splitlines()]


def test_git_status_shows_nothing_but_the_runs_outputs_and_dvc_has_nothing_to_reproduce(clone):
    """On the machine that made the committed reports `git status` is clean; on another CPU only
    the run's own outputs may differ (their figures: the next test)."""
    assert all(path.startswith(RUN_OUTPUTS) for path in _changed(clone)), _changed(clone)
    before = _changed(clone)
    assert "up to date" in clone.run(".venv/bin/dvc", "status").stdout.lower()
    repro = clone.run(".venv/bin/dvc", "repro").stdout
    assert "didn't change, skipping" in repro and "Running stage" not in repro
    assert _changed(clone) == before
    tags = clone.run(".venv/bin/python", "-c", (
        "import mlflow; c = mlflow.MlflowClient('sqlite:///mlflow.db');"
        "print(c.get_model_version_by_alias('infrec-infae', 'champion').tags['git_commit'])"))
    assert not tags.stdout.strip().endswith("+dirty")


def _figures(obj, prefix: str = "") -> dict[str, object]:
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in _figures(value, f"{prefix}{key}.").items()}
    if isinstance(obj, list):
        return {k: v for n, value in enumerate(obj) for k, v in _figures(value, f"{prefix}{n}.").items()}
    return {prefix[:-1]: obj}


def _within(now: object, committed: object) -> bool:
    """The README's tolerance: 0.05 for figures above 1 (metrics ×100), 0.0005 up to 1 (AUC,
    fidelity, ratios); anything not a float (counts, names, verdicts) equal."""
    if isinstance(committed, float) and isinstance(now, (int, float)) and not isinstance(now, bool):
        return abs(now - committed) <= (0.05 if abs(committed) > 1 else 0.0005)
    return now == committed


def test_make_run_reproduces_the_committed_reports_within_the_stated_tolerance(clone):
    """What the README says a fresh clone on another machine reproduces: every figure of
    reports/metrics.json and reports/evaluation.json within the stated tolerance of the
    committed one (on the machine that made them: equal)."""
    for name in ("reports/metrics.json", "reports/evaluation.json"):
        committed = _figures(json.loads(clone.run("git", "show", f"HEAD:{name}").stdout))
        now = _figures(json.loads((clone.root / name).read_text()))
        assert now.keys() == committed.keys(), (name, set(now) ^ set(committed))
        off = {k: (now[k], committed[k]) for k in committed if not _within(now[k], committed[k])}
        assert not off, (name, off)
    text = (REPO / "README.md").read_text()
    assert "0.05 of the committed one for figures above 1" in text and "0.0005" in text


# Every line of the README's fenced shell blocks is either run verbatim below, on the fresh clone
# after `make run`, or named here with where it is tested (or why it cannot run on a laptop).
README_RUN_HERE = re.compile(r"^\.venv/bin/infrec (versions|status|recommend|lineage)\b")
README_ELSEWHERE = {
    r"^make (run|test)\b": "the set-up commands: this module's `make run`, CI's `make test`",
    r"^\.venv/bin/dvc (exp|metrics|plots) ": "the DVC experiment lines: tests in this module",
    r"^\.venv/bin/mlflow (models serve|ui)|^curl -s http://127\.0\.0\.1:5001": "servers: the serve, "
        "curl and browser tests in this module",
    r"^(make server|infrec serve|infrec deploy|(PREFECT_\w+=\w+ )?prefect (server|worker) start)":
        "Prefect servers, deployments and workers: tests/flows/test_schedule.py",
    r"^\.venv/bin/infrec run --input /data/": "a placeholder path: the --input runs of "
        "tests/flows/test_versions.py",
    r"^\.venv/bin/infrec (rollback|promote) ": "change the registry: tests/flows/test_versions.py, "
        "test_pipeline.py",
    r"^(\.venv/bin/)?python -m bench\.": "benchmarks (minutes to hours): bench/, and "
        "tests/bench, tests/models/test_jax_ranking.py",
    r"^(dask (scheduler|worker)|infrec sweep)": "a Dask cluster: tests/tasks/test_cluster.py, "
        "tests/flows/test_sweep.py",
    r"^infrec mlflow-server": "tests/flows/test_mlflow_server.py",
    r"^(export |dvc remote |--|evaluate:|dask_address:)": "settings for a shared deployment (other "
        "hosts), continuation and YAML lines",
}


def _readme_shell_lines() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [ln.split("  #")[0].strip() for block in blocks for ln in block.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _forms(line: str) -> list[str]:
    """A synopsis line with optional ``[parts]``: without them, and with each given."""
    if "[" not in line:
        return [line]
    return [re.sub(r"\s*\[[^]]*\]", "", line), re.sub(r"\[([^]]*)\]", r"\1", line)]


def test_every_readme_shell_line_runs_here_or_is_tested_elsewhere(clone):
    """Each fenced README command that a user runs on the project after `make run` (versions,
    status, recommend, lineage — optional ``[parts]`` without and with) exits 0 on the fresh
    clone and prints something; every other fenced line matches a named place where it is
    tested, so a new README command cannot go unchecked."""
    ran, unclassified = [], []
    for line in _readme_shell_lines():
        if README_RUN_HERE.match(line):
            for form in _forms(line):
                proc = clone.run("bash", "-c", form, check=False, timeout=300)
                assert proc.returncode == 0 and proc.stdout.strip(), (form, proc.returncode,
                                                                      proc.stderr[-2000:])
                assert "Traceback" not in proc.stderr, (form, proc.stderr[-2000:])
                ran.append(form)
        elif not any(re.search(p, line) for p in README_ELSEWHERE):
            unclassified.append(line)
    assert not unclassified, unclassified
    assert len(ran) >= 8, ran
    print(f"{len(ran)} README lines run verbatim:", *ran, sep="\n  ")


def _experiment_lines() -> list[str]:
    """The shell lines of the README's "DVC experiments" block."""
    text = (REPO / "README.md").read_text()
    section = text.split("## DVC experiments", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [ln for ln in block.splitlines() if ln.strip()]


def test_what_the_readme_says_each_experiment_re_runs_is_what_dvc_says(clone):
    """Each `dvc exp run -S KEY=VALUE  # re-runs …` line of the README: with that value in
    params.yaml, `dvc status` names exactly the stages the line names (and no other)."""
    import yaml

    from tasks.params import set_in_file

    claims = [ln for ln in _experiment_lines() if "dvc exp run -S" in ln]
    assert len(claims) >= 2
    stages = ("ingest", "distill", "fit", "evaluate")
    try:
        for line in claims:
            m = re.search(r"-S '?([\w.]+)=([^' ]+)'?\s+#.*?re-runs ([^(]*)", line)
            assert m, line
            key, value, said = m.groups()
            named = {s for s in stages if re.search(rf"\b{s}\b", said)}
            set_in_file(clone.root / "params.yaml", key, yaml.safe_load(value))
            status = json.loads(clone.run(".venv/bin/dvc", "status", "--json").stdout or "{}")
            assert set(status) == named, (line, status)
            clone.run("git", "checkout", "--", "params.yaml")
    finally:
        clone.run("git", "checkout", "--", "params.yaml")


def test_dvc_metrics_experiments_and_plots_show_numbers(clone):
    shown = clone.run(".venv/bin/dvc", "metrics", "show").stdout
    assert "reports/metrics.json" in shown and "reports/evaluation.json" in shown
    diff = clone.run(".venv/bin/dvc", "metrics", "diff", "main")
    assert diff.returncode == 0
    # the README's first experiment, verbatim (gate (c)'s reference on a 500-user sample): only
    # evaluate runs (fit.lambdas is the fit stage's grid too since the candidate may fit all users)
    first = next(ln for ln in _experiment_lines() if "dvc exp run" in ln)
    assert "evaluate.reference_max_users=500" in first and "evaluate only" in first, first
    exp = clone.run("bash", "-c", first.split("#")[0], timeout=1200)
    assert "Running stage 'evaluate'" in exp.stdout, exp.stdout[-3000:]
    assert not any(f"Running stage '{s}'" in exp.stdout for s in ("ingest", "distill", "fit"))
    table = clone.run(".venv/bin/dvc", "exp", "show", "--csv").stdout
    rows = list(csv.DictReader(io.StringIO(table)))
    # DVC names a column by its key alone when no other file has that key, else file:key
    column = next((c for c in ("reports/metrics.json:test.ndcg@10", "test.ndcg@10")
                   if c in rows[0]), None)
    assert column, list(rows[0])
    workspace = next(r for r in rows if r["Experiment"] == "" and r["rev"] == "workspace")
    experiments = [r for r in rows if r["Experiment"]]
    assert experiments and all(float(r[column]) > 0 for r in [workspace, *experiments])
    assert any(r["evaluate.reference_max_users"] == "500" for r in experiments), rows
    # the README's `dvc exp show` line, verbatim, fits a terminal (a wide one may not shrink it)
    show = next(ln for ln in _experiment_lines() if "dvc exp show" in ln)
    shown = subprocess.run(["bash", "-c", show], cwd=clone.root, env=clone.env(COLUMNS="1000"),
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    width = max(len(ln.rstrip()) for ln in shown.stdout.splitlines())
    print(f"README's dvc exp show: {width} characters wide")
    assert width <= 120 and "test.ndcg@10" in shown.stdout and "500" in shown.stdout, (
        width, shown.stdout)
    clone.run(".venv/bin/dvc", "plots", "diff", "main", "-o", "plots-diff")
    html = (clone.root / "plots-diff" / "index.html").read_text()
    assert "lambda_path" in html and "<img" in html  # the PNG plots show offline
    assert '"type": "log"' in html  # the λ-path plot's log x axis
    shutil.rmtree(clone.root / "plots-diff")


def _serving_section() -> tuple[list[str], str]:
    """The README's "Serving the champion" lines: the shell lines of its bash blocks, and the
    response its json block shows."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Serving the champion", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(bash|json)\n(.*?)```", section, flags=re.S)
    lines = [ln for kind, body in blocks if kind == "bash" for ln in body.splitlines() if ln.strip()]
    shown = next(body for kind, body in blocks if kind == "json")
    return lines, shown


def test_readme_serve_and_curl_lines_work_verbatim(clone):
    """The README's serve line, run as written from the clone (no PATH tweak, no export), then
    its curl lines as written: each prints the response the README shows."""
    lines, shown = _serving_section()
    serve = next(ln for ln in lines if "mlflow models serve" in ln)
    curls = [ln for ln in lines if ln.startswith("curl ")]
    assert len(curls) == 2 and any("dataframe_records" in c for c in curls) and any(
        '"inputs"' in c for c in curls)
    env = clean_env()
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                  if not p.startswith(str(REPO)))  # a user's PATH
    env["PYTHONPATH"] = str(clone.root)  # the clone's own code, as in the other tests
    proc = _start(clone, ["bash", "-c", serve], "serve.log", "http://127.0.0.1:5001/ping",
                  env=env, timeout=180)
    try:
        for line in curls:
            out = subprocess.run(["bash", "-c", line], cwd=clone.root, env=env,
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            got, want = json.loads(out.stdout), json.loads(shown)
            assert got["predictions"][0]["items"] == want["predictions"][0]["items"], line
            assert got["predictions"][0]["scores"] == pytest.approx(
                want["predictions"][0]["scores"], rel=1e-5), line
            assert got["predictions"][0]["unknown"] == []
    finally:
        stop_group(proc, grace=30)


LOAD_OUTSIDE = """
import importlib.util, json, sys
# the checkout out of reach: no cwd/PYTHONPATH entry (python -I), no editable-install finder
# (setuptools' finder is a class in sys.meta_path, its path hook a bound method, its sys.path
# entry a placeholder: all three named after the `__editable__...` module)
def editable(obj):
    return "__editable__" in (getattr(obj, "__module__", None) or type(obj).__module__ or "")
sys.meta_path[:] = [f for f in sys.meta_path if not editable(f)]
sys.path_hooks[:] = [h for h in sys.path_hooks if not editable(h)]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
sys.path_importer_cache.clear()
assert all(importlib.util.find_spec(n) is None for n in ("tasks", "models", "flows", "infrec"))
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/infrec-infae@champion")
out = model.predict(pd.DataFrame({"history": [[1578, 4210, 6926]], "k": [5]}))
import tasks.serving
print(json.dumps({"items": [int(x) for x in out["items"][0]], "code": tasks.serving.__file__,
                  "prefect": "prefect" in sys.modules, "tensorflow": "tensorflow" in sys.modules}))
"""


def test_the_model_loads_where_the_checkout_is_not_importable(clone, tmp_path):
    """The registered pyfunc carries its code: it loads and predicts in a Python whose path
    excludes the checkout (run elsewhere, isolated, editable install disabled), from MLflow's
    copy of `models/` and `tasks/`, importing neither Prefect nor TensorFlow."""
    env = clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{clone.root / 'mlflow.db'}")
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-I", "-c", LOAD_OUTSIDE],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    _, shown = _serving_section()
    assert out["items"] == json.loads(shown)["predictions"][0]["items"]
    # MLflow's copy of the code, logged with the model (code_paths), not the checkout's tasks/
    assert "/artifacts/code/tasks/serving.py" in out["code"], out["code"]
    assert not out["code"].startswith((str(REPO / "tasks"), str(clone.root / "tasks"))), out["code"]
    assert not out["prefect"] and not out["tensorflow"]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _rendered(url: str, expect: str, timeout: float = 120) -> str:
    """The DOM headless Chromium renders at ``url``, retried until it contains ``expect``."""
    deadline, dom = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        dom = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                              "--disable-dev-shm-usage", "--virtual-time-budget=20000",
                              "--dump-dom", url],
                             capture_output=True, text=True, timeout=120).stdout
        if expect in dom:
            return dom
        time.sleep(2)
    return dom


def _start(clone, args: list[str], log_name: str, url: str, env: dict | None = None,
           timeout: float = 120) -> subprocess.Popen:
    """Start ``args`` in the clone (its own process group, output to ``log_name``) and wait until
    ``url`` answers 200; its log in the failure when it exits or never answers."""
    log_path = clone.root.parent / log_name
    with log_path.open("w") as log:
        proc = subprocess.Popen(args, cwd=clone.root, env=env or clone.env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            stop_group(proc)  # what it started, if anything is left
            pytest.fail(f"{args} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        code = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url],
                              capture_output=True, text=True).stdout
        if code == "200":
            return proc
        time.sleep(1)
    stop_group(proc, grace=30)
    pytest.fail(f"{args} did not answer {url} within {timeout:.0f} s:\n"
                f"{log_path.read_text()[-3000:]}")


def test_the_uis_in_a_real_browser_show_the_champion_and_the_report(clone):
    """Headless Chromium (Debian's package; `.ci/run` installs it) opens the MLflow UI and the
    Prefect UI that `make run`'s state is served with, on loopback: the registered model with
    its `champion` alias, and the pipeline's flow run with its `promoted` tag and its report."""
    if _chromium() is None:
        message = "chromium not installed (Debian package `chromium`; .ci/run installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; CI=true requires it")
        pytest.skip(message)
    run_id = clone.run(".venv/bin/python", "-c", (
        "import mlflow; c = mlflow.MlflowClient('sqlite:///mlflow.db');"
        "print(c.get_model_version_by_alias('infrec-infae', 'champion')"
        ".tags['prefect_flow_run_id'])")).stdout.strip()
    mlflow_port, prefect_port = free_port(), free_port()
    procs = []
    try:
        procs.append(_start(clone, [".venv/bin/mlflow", "ui", "--host", "127.0.0.1", "--port",
                                    str(mlflow_port)], "mlflow-ui.log",
                            f"http://127.0.0.1:{mlflow_port}/"))
        procs.append(_start(clone, [".venv/bin/infrec", "server", "--port", str(prefect_port)],
                            "prefect-ui.log", f"http://127.0.0.1:{prefect_port}/"))
        # the README's MLflow line opens the model's own page (not MLflow's landing page)
        readme = (REPO / "README.md").read_text()
        page = re.search(r"mlflow ui --port 5000\s+# then open http://127\.0\.0\.1:5000(/\S+)",
                         readme).group(1)
        assert page == "/#/models/infrec-infae", page
        model = _rendered(f"http://127.0.0.1:{mlflow_port}{page}", "champion")
        assert "infrec-infae" in model and "champion" in model, model[-3000:]
        run = _rendered(f"http://127.0.0.1:{prefect_port}/runs/flow-run/{run_id}", "promoted")
        assert "infrec-pipeline" in run and "promoted" in run, run[-3000:]
        # the report's own page (the key's page lists its versions): its id from Prefect's API
        found = post_json(f"http://127.0.0.1:{prefect_port}/api/artifacts/filter",
                      {"artifacts": {"key": {"any_": ["infrec-pipeline-report"]}}})
        assert found, "no infrec-pipeline-report artifact in Prefect"
        report = _rendered(f"http://127.0.0.1:{prefect_port}/artifacts/artifact/{found[0]['id']}",
                           "PopRec")
        # the markdown rendered: the metrics table and the gate table with its verdicts
        for shown in ("PopRec", "EASE", "baselines", "fidelity", "Champion: v1"):
            assert shown in report, (shown, report[-3000:])
    finally:
        for proc in procs:
            stop_group(proc, grace=30)
