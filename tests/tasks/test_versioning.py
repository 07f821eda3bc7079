"""Data versions with real git and a real DVC local remote, in a temporary repository."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.errors import InputError
from tasks.versioning import (
    VERSION_BRANCH,
    VersioningError,
    commit_stages,
    current_version,
    ensure_dvc,
    get_version,
    list_versions,
    push,
    record_version,
    restored,
)

OUTS = ["data/processed", "data/summary.txt"]
DVC_YAML = """stages:
  make:
    cmd: python make.py
    params: [a]
    outs: [data/processed, data/summary.txt]
"""
MAKE = """import yaml, pathlib
a = yaml.safe_load(open("params.yaml"))["a"]
p = pathlib.Path("data/processed"); p.mkdir(parents=True, exist_ok=True)
(p / "rows.txt").write_text(f"rows {a}\\n" * 100)
pathlib.Path("data/summary.txt").write_text(f"summary {a}\\n")
"""


def sh(cwd, *args):
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def produce(root: Path, a: int) -> None:
    (root / "params.yaml").write_text(f"a: {a}\n")
    sh(root, sys.executable, "make.py")
    commit_stages(root, ["make"])
    push(root)


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    root = tmp_path / "ws"
    root.mkdir()
    sh(root, "git", "init", "-q", "-b", "main")
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "make.py").write_text(MAKE)
    (root / "params.yaml").write_text("a: 0\n")
    ensure_dvc(root)
    sh(root, sys.executable, "-m", "dvc", "remote", "add", "-d", "store", str(tmp_path / "remote"))
    sh(root, "git", "add", "-A")
    sh(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return root


def read(root: Path) -> tuple[str, str]:
    return (root / "data/processed/rows.txt").read_text(), (root / "data/summary.txt").read_text()


def test_versions_recorded_off_branch_and_restored_byte_identical(repo, tmp_path):
    head = sh(repo, "git", "rev-parse", "HEAD")
    produce(repo, 1)
    v1, created = record_version(repo, OUTS, {"note": "first"})
    assert created and v1.id == "v1"
    v1_bytes = read(repo)
    again, created = record_version(repo, OUTS)
    assert not created and again.id == "v1"  # same data: no new version
    produce(repo, 2)
    v2, created = record_version(repo, OUTS)
    assert created and v2.id == "v2" and v2.outputs != v1.outputs
    # the working branch did not move and nothing was staged
    assert sh(repo, "git", "rev-parse", "HEAD") == head
    assert sh(repo, "git", "diff", "--cached", "--name-only") == ""
    assert [v.id for v in list_versions(repo)] == ["v1", "v2"]
    assert sh(repo, "git", "rev-parse", f"refs/heads/{VERSION_BRANCH}").strip() == v2.commit

    with restored(repo, get_version(repo, "v1")):
        pass
    assert read(repo) == v1_bytes
    assert current_version(repo, OUTS).id == "v1"

    # a fresh clone without any DVC cache restores from the remote alone
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    assert [v.id for v in list_versions(clone)] == ["v1", "v2"]
    assert not (clone / ".dvc" / "cache").exists()
    with restored(clone, get_version(clone, "v2")):
        pass
    assert read(clone) == ("rows 2\n" * 100, "summary 2\n")


def test_failed_restore_changes_nothing(repo, tmp_path):
    produce(repo, 1)
    record_version(repo, OUTS)
    produce(repo, 2)
    record_version(repo, OUTS)
    before = read(repo), (repo / "dvc.lock").read_text()
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(tmp_path / "remote")  # remote unreachable/empty: v1 cannot be fetched
    with pytest.raises(VersioningError):
        with restored(repo, get_version(repo, "v1")):
            pass
    assert (read(repo), (repo / "dvc.lock").read_text()) == before


def test_failure_inside_the_block_rolls_the_data_back(repo):
    produce(repo, 1)
    record_version(repo, OUTS)
    produce(repo, 2)
    record_version(repo, OUTS)
    before = read(repo)
    with pytest.raises(RuntimeError):
        with restored(repo, get_version(repo, "v1")):
            assert read(repo)[1] == "summary 1\n"
            raise RuntimeError("registry step failed")
    assert read(repo) == before


def test_unknown_version_is_a_clear_error(repo):
    with pytest.raises(InputError, match="v9.*not found"):
        get_version(repo, "v9")
