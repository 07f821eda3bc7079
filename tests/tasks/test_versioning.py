"""Data-version records and verified restores with real git and a real DVC local remote, in a
temporary repository (tasks.dvc, tasks.rollback.stage_version)."""

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tasks.dvc import (VERSION_BRANCH, get_version, list_versions, record_version, run_dvc,
                       set_lock_params)
from tasks.errors import InputError
from tasks.rollback import RestoreError, lock_cached_outs, open_cache, stage_version

pytestmark = pytest.mark.slow  # `make test-fast` leaves it out: real git + DVC workspaces and remotes

OUTS = ["data/processed", "data/summary.txt"]
DVC_YAML = """stages:
  make:
    cmd: python make.py
    params: [a, grid]
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


def produce(root: Path, a: int):
    (root / "params.yaml").write_text(f"a: {a}\ngrid: [0.00001, 1]\n")
    sh(root, sys.executable, "make.py")
    run_dvc(root, "commit", "-f", "make")
    run_dvc(root, "push")
    return record_version(root, (root / "dvc.lock").read_text(), OUTS, {"a": a},
                          {"reports/a.txt": f"{a}\n".encode()})


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    root = tmp_path / "ws"
    root.mkdir()
    sh(root, "git", "init", "-q", "-b", "main")
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "make.py").write_text(MAKE)
    (root / "params.yaml").write_text("a: 0\ngrid: [1]\n")
    run_dvc(root, "init", "-q")
    run_dvc(root, "remote", "add", "-d", "store", str(tmp_path / "remote"))
    sh(root, "git", "add", "-A")
    sh(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return root


def read(root: Path) -> tuple[str, str]:
    return (root / "data/processed/rows.txt").read_text(), (root / "data/summary.txt").read_text()


def test_versions_recorded_off_branch_once_per_content(repo):
    head = sh(repo, "git", "rev-parse", "HEAD")
    v1, created = produce(repo, 1)
    assert created and v1.id == "v1" and v1.info == {"a": 1}
    again, created = produce(repo, 1)
    assert not created and again.id == "v1"  # same data: no new version
    v2, created = produce(repo, 2)
    assert created and v2.id == "v2" and v2.hashes() != v1.hashes()
    # the working branch did not move and nothing was staged
    assert sh(repo, "git", "rev-parse", "HEAD") == head
    assert sh(repo, "git", "diff", "--cached", "--name-only") == ""
    assert [v.id for v in list_versions(repo)] == ["v1", "v2"]
    assert sh(repo, "git", "rev-parse", f"refs/heads/{VERSION_BRANCH}").strip() == v2.commit
    files = sh(repo, "git", "ls-tree", "-r", "--name-only", v2.commit).split()
    assert files == ["dvc.lock", "reports/a.txt", "version.json"]


def test_stray_and_broken_tags_are_skipped_with_a_warning(repo):
    produce(repo, 1)
    sh(repo, "git", "tag", "data/v7", "HEAD")  # a data/vN tag without a version record
    sh(repo, "git", "tag", "data/latest", "HEAD")  # not a version name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [v.id for v in list_versions(repo)] == ["v1"]
    messages = " ".join(str(w.message) for w in caught)
    assert "data/v7" in messages and "data/latest" in messages
    v, created = produce(repo, 2)  # numbering skips the taken tag
    assert created and v.id == "v8"


def test_stage_version_restores_byte_identical_from_cache_or_remote(repo, tmp_path):
    produce(repo, 1)
    v1_bytes = read(repo)
    produce(repo, 2)
    staged = stage_version(repo, get_version(repo, "v1"), tmp_path / "stage")
    assert sorted(staged["outs"]) == OUTS and staged["files"] == ["reports/a.txt"]
    assert read(tmp_path / "stage") == v1_bytes
    assert (tmp_path / "stage" / "reports" / "a.txt").read_text() == "1\n"
    assert read(repo)[1] == "summary 2\n"  # the workspace was not touched
    # a fresh clone without any DVC cache restores from the remote alone
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    assert [v.id for v in list_versions(clone)] == ["v1", "v2"]
    stage_version(clone, get_version(clone, "v1"), tmp_path / "stage2")
    assert read(tmp_path / "stage2") == v1_bytes


def _cache_object(root: Path, md5: str) -> Path:
    with open_cache(root) as cache:
        return cache.path(md5)


def test_a_flipped_byte_in_the_cache_is_repaired_from_the_remote(repo, tmp_path):
    produce(repo, 1)
    v1_bytes = read(repo)
    produce(repo, 2)
    v1 = get_version(repo, "v1")
    md5 = lock_cached_outs(sh(repo, "git", "show", f"{v1.commit}:dvc.lock"))["data/summary.txt"]
    obj = _cache_object(repo, md5)
    obj.chmod(0o644)
    data = bytearray(obj.read_bytes())
    data[0] ^= 0xFF
    obj.write_bytes(bytes(data))
    stage_version(repo, v1, tmp_path / "stage")
    assert read(tmp_path / "stage") == v1_bytes
    assert _cache_object(repo, md5).read_bytes() != bytes(data)  # the cache was repaired


def test_no_intact_copy_anywhere_is_one_line_and_changes_nothing(repo, tmp_path):
    produce(repo, 1)
    produce(repo, 2)
    v1 = get_version(repo, "v1")
    md5 = lock_cached_outs(sh(repo, "git", "show", f"{v1.commit}:dvc.lock"))["data/summary.txt"]
    for root in (repo / ".dvc" / "cache", tmp_path / "remote"):
        for obj in root.rglob(md5[2:]):
            obj.chmod(0o644)
            obj.write_bytes(b"corrupt")
    before = read(repo), (repo / "dvc.lock").read_text()
    with pytest.raises(RestoreError) as err:
        stage_version(repo, v1, tmp_path / "stage")
    assert "\n" not in str(err.value) and "v1" in str(err.value)
    assert (read(repo), (repo / "dvc.lock").read_text()) == before
    shutil.rmtree(tmp_path / "remote")  # unreachable remote and no cache: also one line
    shutil.rmtree(repo / ".dvc" / "cache")
    with pytest.raises(RestoreError):
        stage_version(repo, v1, tmp_path / "stage3")


def test_lock_records_the_params_used(repo):
    produce(repo, 1)
    text = (repo / "dvc.lock").read_text()
    assert set_lock_params(text, {"a": 1, "grid": [1e-5, 1.0]}) == text  # same values
    changed = set_lock_params(text, {"a": 5, "grid": [1e-5, 1.0]})
    assert "a: 5" in changed and changed != text


def test_unknown_version_is_a_clear_error(repo):
    with pytest.raises(InputError, match="v9.*not found"):
        get_version(repo, "v9")


def test_versions_are_found_without_tags_and_fetched_into_a_single_branch_clone(repo, tmp_path):
    """Tags may be absent: a clone made with `--no-tags --single-branch` has neither the tags nor
    the versions branch (rollback fetches both from origin), and a repository whose tags were
    deleted still lists its versions from the branch — and numbers the next one after them."""
    produce(repo, 1)
    produce(repo, 2)
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", "--no-tags", "--single-branch", str(repo), str(clone))
    assert sh(clone, "git", "tag", "--list") == "" and list_versions(clone) == []
    assert get_version(clone, "v1").info == {"a": 1}  # fetched from origin
    assert [v.id for v in list_versions(clone)] == ["v1", "v2"]
    for tag in ("data/v1", "data/v2"):
        sh(repo, "git", "tag", "-d", tag)
    assert [(v.id, v.info) for v in list_versions(repo)] == [("v1", {"a": 1}), ("v2", {"a": 2})]
    v3, created = produce(repo, 3)
    assert created and v3.id == "v3"
