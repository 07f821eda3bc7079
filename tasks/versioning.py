"""Data versions: DVC-tracked processed data and summary, recorded in git without touching the
user's working branch.

Design
------
* The pipeline's outputs are DVC stage outputs (``dvc.yaml``). After a run, ``dvc commit``
  records their hashes in ``dvc.lock`` and the DVC cache, and ``dvc push`` sends them to the DVC
  remote (the embedded default: a local directory remote under the state folder, set in
  ``.dvc/config.local``; any S3/GCS/SSH remote by ordinary ``dvc remote add -d``).
* A data version is a git commit made with plumbing (``hash-object``/``mktree``/``commit-tree``)
  on the dedicated branch ``infrec/data-versions`` — its tree holds that run's ``dvc.lock`` and a
  ``version.json`` — plus a lightweight tag ``data/vN`` pointing at it. Nothing is checked out,
  staged or committed on the working branch. Share versions with ``git push origin
  infrec/data-versions --tags``; a fresh clone sees them through the tags.
* Restoring version ``vN`` writes its ``dvc.lock`` into the workspace and runs ``dvc checkout`` of
  the versioned outputs, fetching them from the remote first when the cache lacks them. A failure
  puts the previous ``dvc.lock`` and outputs back.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import yaml

from tasks.errors import InputError

VERSION_BRANCH = "infrec/data-versions"
TAG_PREFIX = "data/"
_TAG_RE = re.compile(r"^v(\d+)$")
_GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "infrec",
    "GIT_AUTHOR_EMAIL": "infrec@localhost",
    "GIT_COMMITTER_NAME": "infrec",
    "GIT_COMMITTER_EMAIL": "infrec@localhost",
}


class VersioningError(RuntimeError):
    """A git or DVC step of versioning failed (message is one line)."""


@dataclass(frozen=True)
class DataVersion:
    """One recorded data version."""

    id: str  # "v3"
    created: str  # ISO-8601 UTC
    commit: str  # git commit on the versions branch
    outputs: dict[str, dict[str, Any]]  # path -> {"md5", "size", "nfiles"?}
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def number(self) -> int:
        return int(self.id[1:])

    @property
    def size(self) -> int:
        return int(sum(o.get("size", 0) or 0 for o in self.outputs.values()))

    def to_json(self) -> dict[str, Any]:
        return {"version": self.id, "created": self.created, "commit": self.commit,
                "hashes": {p: o.get("md5") for p, o in self.outputs.items()}, "size": self.size,
                "info": self.info}


# -- git helpers ---------------------------------------------------------------------------------
def _git(root: Path, *args: str, input: str | None = None, check: bool = True) -> str:
    env = dict(os.environ)
    for key, value in _GIT_IDENTITY.items():
        env.setdefault(key, value)
    proc = subprocess.run(["git", *args], cwd=root, input=input, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise VersioningError(f"git {' '.join(args[:2])} failed: {msg[-1] if msg else proc.returncode}")
    return proc.stdout.strip()


def git_root(path: str | Path = ".") -> Path:
    """The git work tree containing ``path`` (an :class:`InputError` outside one)."""
    proc = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=path, capture_output=True, text=True)
    if proc.returncode != 0:
        raise InputError(f"{Path(path).resolve()}: not inside a git repository (data versions need git)")
    return Path(proc.stdout.strip())


def git_head(root: Path) -> str | None:
    out = _git(root, "rev-parse", "--verify", "--quiet", "HEAD", check=False)
    return out or None


# -- DVC helpers ---------------------------------------------------------------------------------
def ensure_dvc(root: Path, default_remote: Path | None = None) -> None:
    """``dvc init`` if needed; add ``default_remote`` (local, in config.local) if no remote is set."""
    if not (root / ".dvc").is_dir():
        _run_dvc(root, "init", "-q")
    if default_remote is not None and not _dvc_config(root, "core.remote"):
        default_remote.mkdir(parents=True, exist_ok=True)
        _run_dvc(root, "remote", "add", "--local", "--force", "-d", "infrec-local", str(default_remote))


def _run_dvc(root: Path, *args: str) -> str:
    """Run the DVC CLI of this interpreter in ``root``; raise a one-line error on failure."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        raise VersioningError(f"dvc {args[0]} failed: {lines[-1].strip() if lines else f'exit {proc.returncode}'}")
    return proc.stdout


def _dvc_config(root: Path, key: str) -> str:
    """A DVC config value ('' when unset)."""
    try:
        return _run_dvc(root, "config", key).strip()
    except VersioningError:
        return ""


def commit_stages(root: Path, stages: list[str]) -> None:
    """``dvc commit -f`` the stages: their outputs go to the cache and their hashes to dvc.lock."""
    for stage in stages:
        _run_dvc(root, "commit", "-f", stage)


def push(root: Path, targets: list[str] | None = None) -> None:
    _run_dvc(root, "push", *(targets or []))


def read_lock(root: Path) -> dict[str, Any]:
    path = root / "dvc.lock"
    if not path.is_file():
        raise VersioningError(f"{path}: missing (run the pipeline or `dvc repro` first)")
    return yaml.safe_load(path.read_text()) or {}


def lock_outputs(lock: dict[str, Any], paths: list[str]) -> dict[str, dict[str, Any]]:
    """The dvc.lock entries (md5, size, nfiles) of the given output paths."""
    found: dict[str, dict[str, Any]] = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if out.get("path") in paths:
                found[out["path"]] = {k: out[k] for k in ("md5", "size", "nfiles") if k in out}
    missing = [p for p in paths if p not in found]
    if missing:
        raise VersioningError(f"dvc.lock has no output {missing[0]!r}")
    return found


# -- versions ------------------------------------------------------------------------------------
def list_versions(root: Path) -> list[DataVersion]:
    """All data versions, oldest first (from the ``data/vN`` tags)."""
    out = _git(root, "for-each-ref", "--format=%(refname:strip=2) %(objectname)", f"refs/tags/{TAG_PREFIX}")
    versions = []
    for line in out.splitlines():
        name, sha = line.split()
        vid = name[len(TAG_PREFIX):]
        if not _TAG_RE.match(vid):
            continue
        meta = json.loads(_git(root, "show", f"{sha}:version.json"))
        versions.append(DataVersion(id=vid, created=meta["created"], commit=sha,
                                    outputs=meta["outputs"], info=meta.get("info", {})))
    return sorted(versions, key=lambda v: v.number)


def get_version(root: Path, version_id: str) -> DataVersion:
    vid = version_id if version_id.startswith("v") else f"v{version_id}"
    for v in list_versions(root):
        if v.id == vid:
            return v
    known = ", ".join(v.id for v in list_versions(root)) or "none"
    raise InputError(f"data version {version_id!r} not found (known: {known})")


def record_version(root: Path, paths: list[str], info: dict[str, Any] | None = None) -> tuple[DataVersion, bool]:
    """Record the current dvc.lock's ``paths`` as a new version unless the newest has the same hashes.

    Returns ``(version, created)``. Only refs under ``infrec/data-versions`` and ``data/`` change.
    """
    lock_text = (root / "dvc.lock").read_text() if (root / "dvc.lock").is_file() else ""
    outputs = lock_outputs(yaml.safe_load(lock_text) or {}, paths)
    existing = list_versions(root)
    for v in reversed(existing):
        if {p: o.get("md5") for p, o in v.outputs.items()} == {p: o.get("md5") for p, o in outputs.items()}:
            return v, False
    number = (existing[-1].number + 1) if existing else 1
    vid = f"v{number}"
    created = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    meta = {"version": vid, "created": created, "outputs": outputs, "info": info or {}}
    blob_lock = _git(root, "hash-object", "-w", "--stdin", input=lock_text)
    blob_meta = _git(root, "hash-object", "-w", "--stdin", input=json.dumps(meta, indent=2) + "\n")
    tree = _git(root, "mktree", input=f"100644 blob {blob_lock}\tdvc.lock\n100644 blob {blob_meta}\tversion.json\n")
    parent = _git(root, "rev-parse", "--verify", "--quiet", f"refs/heads/{VERSION_BRANCH}", check=False)
    args = ["commit-tree", tree, "-m", f"infrec data version {vid}"]
    if parent:
        args[2:2] = ["-p", parent]
    sha = _git(root, *args)
    _git(root, "update-ref", f"refs/heads/{VERSION_BRANCH}", sha, *([parent] if parent else []))
    _git(root, "update-ref", f"refs/tags/{TAG_PREFIX}{vid}", sha, "0" * 40)
    return DataVersion(id=vid, created=created, commit=sha, outputs=outputs, info=info or {}), True


def current_version(root: Path, paths: list[str]) -> DataVersion | None:
    """The recorded version whose hashes equal the workspace's dvc.lock, if any."""
    try:
        outputs = lock_outputs(read_lock(root), paths)
    except VersioningError:
        return None
    want = {p: o.get("md5") for p, o in outputs.items()}
    for v in reversed(list_versions(root)):
        if {p: o.get("md5") for p, o in v.outputs.items()} == want:
            return v
    return None


@contextlib.contextmanager
def _saved_workspace(root: Path, paths: list[str]) -> Iterator[None]:
    """Keep a copy of dvc.lock and of ``paths``; put them back if the block fails."""
    backup = Path(tempfile.mkdtemp(prefix=".infrec-restore-", dir=root))
    try:
        if (root / "dvc.lock").exists():
            shutil.copy2(root / "dvc.lock", backup / "dvc.lock")
        for i, p in enumerate(paths):
            src = root / p
            if src.is_dir():
                shutil.copytree(src, backup / str(i), symlinks=True)
            elif src.exists():
                shutil.copy2(src, backup / str(i))
        try:
            yield
        except BaseException:
            for i, p in enumerate(paths):
                dst, saved = root / p, backup / str(i)
                if dst.is_dir() and not dst.is_symlink():
                    shutil.rmtree(dst)
                elif dst.exists() or dst.is_symlink():
                    dst.unlink()
                if saved.is_dir():
                    shutil.copytree(saved, dst, symlinks=True)
                elif saved.exists():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(saved, dst)
            if (backup / "dvc.lock").exists():
                shutil.copy2(backup / "dvc.lock", root / "dvc.lock")
            raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def restored(root: Path, version: DataVersion) -> Iterator[None]:
    """Restore ``version``'s outputs (and its dvc.lock) for the block; undo it all if the block —
    or the restore itself — fails. Fetches from the DVC remote when the cache lacks the data."""
    paths = sorted(version.outputs)
    with _saved_workspace(root, paths):
        lock_text = _git(root, "show", f"{version.commit}:dvc.lock") + "\n"
        (root / "dvc.lock").write_text(lock_text)
        try:
            _run_dvc(root, "checkout", "-f", *paths)
        except VersioningError:
            _run_dvc(root, "fetch", *paths)
            _run_dvc(root, "checkout", "-f", *paths)
        yield


def version_stage_outputs(
    root: Path, stages: list[str], paths: list[str], remote_dir: Path | None, info: dict[str, Any]
) -> dict[str, Any]:
    """After a pipeline run: cache + push the stages' outputs and record a data version.

    ``paths`` (relative to ``root``) are the versioned outputs (processed data, summary).
    """
    ensure_dvc(root, remote_dir)
    commit_stages(root, stages)
    push(root, paths)
    version, created = record_version(root, paths, info)
    return {"version": version.id, "created": created, "commit": version.commit,
            "hashes": {p: o.get("md5") for p, o in version.outputs.items()}}
