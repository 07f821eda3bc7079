"""First contact, as a new user meets infrec: a fresh clone of the committed project, `make run`,
then git, DVC and the DVC experiment commands — exactly as the README says.

The clone uses this checkout's virtualenv (linked, so nothing is reinstalled) and its own code
(PYTHONPATH). One `make run` serves every test of the module."""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO, clean_env, sh

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
    c.make_run = c.run("make", "run")
    yield c
    shutil.rmtree(root / ".infrec", ignore_errors=True)


def test_make_run_prints_a_readable_summary(clone):
    out = clone.make_run.stdout
    for line in ("registered: infrec-infae version 1", "candidate test:", "gates (ndcg@10):",
                 "PASS baselines", "champion:"):
        assert line in out, out[-3000:]


def test_git_status_is_clean_and_dvc_has_nothing_to_reproduce(clone):
    assert clone.run("git", "status", "--porcelain").stdout == ""
    assert "up to date" in clone.run(".venv/bin/dvc", "status").stdout.lower()
    repro = clone.run(".venv/bin/dvc", "repro").stdout
    assert "didn't change, skipping" in repro and "Running stage" not in repro
    assert clone.run("git", "status", "--porcelain").stdout == ""
    tags = clone.run(".venv/bin/python", "-c", (
        "import mlflow; c = mlflow.MlflowClient('sqlite:///mlflow.db');"
        "print(c.get_model_version_by_alias('infrec-infae', 'champion').tags['git_commit'])"))
    assert not tags.stdout.strip().endswith("+dirty")


def test_dvc_metrics_experiments_and_plots_show_numbers(clone):
    shown = clone.run(".venv/bin/dvc", "metrics", "show").stdout
    assert "reports/metrics.json" in shown and "reports/evaluation.json" in shown
    diff = clone.run(".venv/bin/dvc", "metrics", "diff", "main")
    assert diff.returncode == 0
    exp = clone.run(".venv/bin/dvc", "exp", "run", "-S", "fit.depth=2", timeout=1200)
    assert "Running stage 'fit'" in exp.stdout and "Running stage 'ingest'" not in exp.stdout
    table = clone.run(".venv/bin/dvc", "exp", "show", "--csv").stdout
    rows = list(csv.DictReader(io.StringIO(table)))
    # DVC names a column by its key alone when no other file has that key, else file:key
    column = next((c for c in ("reports/metrics.json:test.ndcg@10", "test.ndcg@10")
                   if c in rows[0]), None)
    assert column, list(rows[0])
    workspace = next(r for r in rows if r["Experiment"] == "" and r["rev"] == "workspace")
    experiments = [r for r in rows if r["Experiment"]]
    assert experiments and all(float(r[column]) > 0 for r in [workspace, *experiments])
    assert any(r["fit.depth"] == "2" for r in experiments)
    clone.run(".venv/bin/dvc", "plots", "diff", "main", "-o", "plots-diff")
    html = (clone.root / "plots-diff" / "index.html").read_text()
    assert "lambda_path" in html and "<img" in html  # the PNG plots show offline
    assert '"type": "log"' in html  # the λ-path plot's log x axis
    shutil.rmtree(clone.root / "plots-diff")

