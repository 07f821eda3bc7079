"""Git and DVC plumbing for data versions: DVC commit/push/fetch/checkout, and the version records.

* A pipeline run's outputs are the DVC stage outputs of ``dvc.yaml``: ``dvc commit`` records
  their hashes in ``dvc.lock`` and puts them in the DVC cache; ``dvc push`` sends them to the
  remote (the default remote, or — when none is configured — a local directory remote under the
  state folder, set in ``.dvc/config.local``).
* A **data version** is a git commit made with plumbing (``hash-object``/``mktree``/
  ``commit-tree``) on the branch ``infrec/data-versions`` — its tree holds that run's
  ``dvc.lock``, a ``version.json`` (input file hash, params used, code commit, flow run, output
  hashes) and the run's ``reports/`` files — plus a tag ``data/vN``. Nothing is checked out,
  staged or committed on the user's branch. Share versions with
  ``git push origin infrec/data-versions --tags``.
* A version's identity is the content of its data: the input snapshot, the processed data and the
  summary (their DVC hashes). Unchanged content makes no new version.

Every git/DVC child process dies with its parent (``tasks.runtime.run_child``).
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from tasks.errors import InputError
from tasks.runtime import run_child

VERSION_BRANCH = "infrec/data-versions"
TAG_PREFIX = "data/"
_TAG_RE = re.compile(r"^v([1-9]\d*)$")
_GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "infrec", "GIT_AUTHOR_EMAIL": "infrec@localhost",
    "GIT_COMMITTER_NAME": "infrec", "GIT_COMMITTER_EMAIL": "infrec@localhost",
}
DVC_STAGES = ("ingest", "distill", "fit", "evaluate")
DATA_OUTS = ("data/input", "data/processed", "data/summary.parquet")  # under the state dir


class VersioningError(RuntimeError):
    """A git or DVC step of versioning failed (message is one line)."""


@dataclass(frozen=True)
class DataVersion:
    """One recorded data version."""

    id: str  # "v3"
    created: str  # ISO-8601 UTC
    commit: str  # git commit on the versions branch
    outputs: dict[str, dict[str, Any]]  # data outputs: path -> {"md5", "size", "nfiles"?}
    info: dict[str, Any] = field(default_factory=dict)  # input, params, code, flow run, …

    @property
    def number(self) -> int:
        return int(self.id[1:])

    @property
    def size(self) -> int:
        return int(sum(o.get("size", 0) or 0 for o in self.outputs.values()))

    def hashes(self) -> dict[str, Optional[str]]:
        return {p: o.get("md5") for p, o in self.outputs.items()}

    def to_json(self) -> dict[str, Any]:
        return {"version": self.id, "created": self.created, "commit": self.commit,
                "hashes": self.hashes(), "size": self.size, "info": self.info}


# -- git -----------------------------------------------------------------------------------------
def git(root: Path, *args: str, input: str | None = None, check: bool = True) -> str:
    env = dict(os.environ)
    for key, value in _GIT_IDENTITY.items():
        env.setdefault(key, value)
    proc = run_child(["git", *args], cwd=root, input=input, env=env)
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise VersioningError(f"git {' '.join(args[:2])} failed: "
                              f"{msg[-1] if msg else proc.returncode}")
    return proc.stdout.strip()


def git_root(path: str | Path = ".") -> Path:
    """The git work tree containing ``path`` (an :class:`InputError` outside one)."""
    proc = run_child(["git", "rev-parse", "--show-toplevel"], cwd=path)
    if proc.returncode != 0:
        raise InputError(f"{Path(path).resolve()}: not inside a git repository (data versions "
                         "need git: `git init`, or set versioning.enabled: false)")
    return Path(proc.stdout.strip())


def git_show(root: Path, rev_path: str) -> bytes:
    """The bytes of ``REV:PATH``."""
    proc = run_child(["git", "show", rev_path], cwd=root, text=False)
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines() or ["?"]
        raise VersioningError(f"git show {rev_path} failed: {lines[-1]}")
    return proc.stdout


# -- DVC -----------------------------------------------------------------------------------------
def run_dvc(root: Path, *args: str) -> str:
    """Run the DVC CLI of this interpreter in ``root``; raise a one-line error on failure."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    proc = run_child([sys.executable, "-m", "dvc", *args], cwd=root, env=env)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        detail = lines[-1].strip() if lines else f"exit {proc.returncode}"
        raise VersioningError(f"dvc {args[0]} failed: {detail}")
    return proc.stdout


@contextmanager
def dvc_repo(root: Path) -> Iterator[Any]:
    """DVC's own Python API on ``root`` (in this process: no interpreter start-up per command);
    its errors become one-line :class:`VersioningError`."""
    import logging

    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    logging.getLogger("dvc").setLevel(logging.WARNING)  # no "Updating lock file" chatter
    try:
        with Repo(str(root)) as repo:
            yield repo
    except DvcException as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise VersioningError(f"dvc: {first}") from None


def ensure_dvc(root: Path, default_remote: Path | None = None) -> None:
    """``dvc init`` if needed; add ``default_remote`` (local, in config.local) if no remote."""
    if not (root / ".dvc").is_dir():
        run_dvc(root, "init", "-q")
    if default_remote is None:
        return
    with dvc_repo(root) as repo:
        if repo.config["core"].get("remote"):
            return
        default_remote.mkdir(parents=True, exist_ok=True)
        with repo.config.edit("local") as conf:
            conf["remote"]["infrec-local"] = {"url": str(default_remote)}
            conf["core"]["remote"] = "infrec-local"


def commit_stages(root: Path, stages: tuple[str, ...] | list[str]) -> None:
    """``dvc commit -f`` of ``stages``: outputs to the cache, hashes to dvc.lock."""
    with dvc_repo(root) as repo:
        for stage in stages:
            repo.commit(stage, force=True)


def push(root: Path) -> None:
    """``dvc push`` of the workspace's outputs to the default remote."""
    with dvc_repo(root) as repo:
        repo.push()


def read_lock(root: Path) -> dict[str, Any]:
    path = root / "dvc.lock"
    if not path.is_file():
        raise VersioningError(f"{path}: missing (run the pipeline or `dvc repro` first)")
    return yaml.safe_load(path.read_text()) or {}


def lock_outputs(lock: dict[str, Any], paths: Optional[list[str]] = None
                 ) -> dict[str, dict[str, Any]]:
    """The dvc.lock entries (md5, size, nfiles) of ``paths`` (all cached outs when None)."""
    found: dict[str, dict[str, Any]] = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if paths is None or out.get("path") in paths:
                found[out["path"]] = {k: out[k] for k in ("md5", "size", "nfiles") if k in out}
    missing = [p for p in paths or [] if p not in found]
    if missing:
        raise VersioningError(f"dvc.lock has no output {missing[0]!r}")
    return found


def set_lock_params(lock_text: str, params: dict[str, Any]) -> str:
    """``dvc.lock`` with every recorded ``params.yaml`` value replaced by the value in
    ``params`` (the params a run actually used — DVC itself reads the workspace's params.yaml)."""
    from tasks.params import get_key

    lock = yaml.safe_load(lock_text) or {}
    changed = False
    for stage in (lock.get("stages") or {}).values():
        recorded = (stage.get("params") or {}).get("params.yaml") or {}
        for key in list(recorded):
            try:
                value = get_key(params, key)
            except KeyError:
                continue
            if _same_value(recorded[key], value):
                continue
            recorded[key] = value
            changed = True
    if not changed:
        return lock_text
    return yaml.safe_dump(lock, sort_keys=False, allow_unicode=True)


def _same_value(a: Any, b: Any) -> bool:
    """Equal as parameter values: DVC writes some floats as strings (``'1e-05'``) and ints where
    the file has ``1`` for ``1.0``."""
    def norm(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        if isinstance(v, bool) or v is None:
            return v
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                return v
        return v

    return norm(a) == norm(b)


# -- version records -----------------------------------------------------------------------------
def list_versions(root: Path, warn: bool = True) -> list[DataVersion]:
    """All data versions, oldest first: the ``data/vN`` tags, and the commits of the branch
    ``infrec/data-versions`` that no tag names (a clone made with ``--no-tags``, or tags
    deleted, still finds its versions). A tag that is not a data version (another name, or no
    readable record) is skipped with a warning."""
    out = git(root, "for-each-ref", "--format=%(refname:strip=2) %(objectname)",
              f"refs/tags/{TAG_PREFIX}")
    versions, tagged = [], set()
    for line in out.splitlines():
        name, sha = line.split()
        tagged.add(sha)
        vid = name[len(TAG_PREFIX):]
        if not _TAG_RE.match(vid):
            if warn:
                warnings.warn(f"git tag {name}: not a data version name (data/vN); skipped",
                              stacklevel=2)
            continue
        try:
            versions.append(_read_version(root, vid, sha))
        except (VersioningError, json.JSONDecodeError, KeyError, TypeError) as exc:
            if warn:
                warnings.warn(f"git tag {name}: no readable data version record "
                              f"({type(exc).__name__}); skipped", stacklevel=2)
    found = {v.id for v in versions}
    branch = git(root, "rev-list", f"refs/heads/{VERSION_BRANCH}", "--", check=False)
    for sha in branch.splitlines():
        if sha in tagged:
            continue
        try:
            meta = json.loads(git_show(root, f"{sha}:version.json"))
            vid = meta["version"]
            if _TAG_RE.match(vid) and vid not in found:
                versions.append(_read_version(root, vid, sha, meta))
                found.add(vid)
        except (VersioningError, json.JSONDecodeError, KeyError, TypeError):
            continue
    return sorted(versions, key=lambda v: v.number)


def _read_version(root: Path, vid: str, sha: str,
                  meta: Optional[dict[str, Any]] = None) -> DataVersion:
    meta = meta if meta is not None else json.loads(git_show(root, f"{sha}:version.json"))
    return DataVersion(id=vid, created=meta["created"], commit=sha, outputs=meta["outputs"],
                       info=meta.get("info", {}))


def fetch_versions(root: Path) -> bool:
    """Fetch the data versions (the branch ``infrec/data-versions`` and the ``data/`` tags) from
    the ``origin`` remote, when there is one (a clone made with ``--single-branch --no-tags``
    has neither); True when something was fetched."""
    remotes = git(root, "remote", check=False).split()
    if "origin" not in remotes:
        return False
    before = git(root, "rev-parse", "--verify", "--quiet", f"refs/heads/{VERSION_BRANCH}",
                 check=False)
    git(root, "fetch", "--quiet", "origin",
        f"+refs/heads/{VERSION_BRANCH}:refs/heads/{VERSION_BRANCH}",
        f"refs/tags/{TAG_PREFIX}*:refs/tags/{TAG_PREFIX}*", check=False)
    after = git(root, "rev-parse", "--verify", "--quiet", f"refs/heads/{VERSION_BRANCH}",
                check=False)
    return bool(after) and after != before


def get_version(root: Path, version_id: str) -> DataVersion:
    """Version ``vN`` (``N`` also accepted); when this repository does not have it, the versions
    are fetched from ``origin`` first (:func:`fetch_versions`)."""
    vid = version_id if version_id.startswith("v") else f"v{version_id}"
    versions = list_versions(root)
    if not any(v.id == vid for v in versions) and fetch_versions(root):
        versions = list_versions(root)
    for v in versions:
        if v.id == vid:
            return v
    known = ", ".join(v.id for v in versions) or "none"
    raise InputError(f"data version {version_id!r} not found (known: {known}; versions are the "
                     f"branch {VERSION_BRANCH} and its {TAG_PREFIX}vN tags: "
                     f"`git fetch origin {VERSION_BRANCH} --tags` brings another clone's)")


def find_version(root: Path, outputs: dict[str, dict[str, Any]]) -> Optional[DataVersion]:
    """The newest version whose data hashes equal ``outputs``'."""
    want = {p: o.get("md5") for p, o in outputs.items()}
    for v in reversed(list_versions(root)):
        if v.hashes() == want:
            return v
    return None


def record_version(root: Path, lock_text: str, data_paths: list[str], info: dict[str, Any],
                   files: dict[str, bytes]) -> tuple[DataVersion, bool]:
    """Record ``lock_text``'s ``data_paths`` as a new version unless one has the same hashes.

    ``files``: further files of the record (``reports/metrics.json`` → bytes). Returns
    ``(version, created)``. Only refs under ``infrec/data-versions`` and ``data/`` change; the
    tag is created last, so a crash midway leaves no half-recorded version.
    """
    outputs = lock_outputs(yaml.safe_load(lock_text) or {}, data_paths)
    existing = find_version(root, outputs)
    if existing is not None:
        return existing, False
    versions = list_versions(root, warn=False)
    taken = {int(m.group(1)) for line in git(root, "tag", "--list", f"{TAG_PREFIX}v*").splitlines()
             if (m := _TAG_RE.match(line[len(TAG_PREFIX):]))}
    number = max([v.number for v in versions] + list(taken) + [0]) + 1
    vid = f"v{number}"
    created = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    meta = {"version": vid, "created": created, "outputs": outputs, "info": info}
    entries = {"dvc.lock": lock_text.encode(),
               "version.json": (json.dumps(meta, indent=2) + "\n").encode(), **files}
    tree = _write_tree(root, entries)
    parent = git(root, "rev-parse", "--verify", "--quiet", f"refs/heads/{VERSION_BRANCH}",
                 check=False)
    args = ["commit-tree", tree, "-m", f"infrec data version {vid}"]
    if parent:
        args[2:2] = ["-p", parent]
    sha = git(root, *args)
    git(root, "update-ref", f"refs/heads/{VERSION_BRANCH}", sha, *([parent] if parent else []))
    git(root, "update-ref", f"refs/tags/{TAG_PREFIX}{vid}", sha, "0" * 40)
    return DataVersion(id=vid, created=created, commit=sha, outputs=outputs, info=info), True


def _write_tree(root: Path, entries: dict[str, bytes]) -> str:
    """A git tree of ``{"a/b.json": bytes}`` (nested folders), written with plumbing."""
    blobs: dict[str, Any] = {}
    for path, data in entries.items():
        node = blobs
        parts = path.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = data

    def mktree(node: dict[str, Any]) -> str:
        lines = []
        for name, value in sorted(node.items()):
            if isinstance(value, dict):
                lines.append(f"040000 tree {mktree(value)}\t{name}")
            else:
                blob = _hash_object(root, value)
                lines.append(f"100644 blob {blob}\t{name}")
        return git(root, "mktree", input="\n".join(lines) + "\n")

    return mktree(blobs)


def _hash_object(root: Path, data: bytes) -> str:
    proc = run_child(["git", "hash-object", "-w", "--stdin"], cwd=root, input=data, text=False)
    if proc.returncode != 0:
        raise VersioningError(f"git hash-object failed: {proc.stderr.decode().strip()}")
    return proc.stdout.decode().strip()


def version_files(root: Path, version: DataVersion) -> dict[str, bytes]:
    """Every file of a version's record except ``version.json`` (``dvc.lock``, ``reports/…``)."""
    names = git(root, "ls-tree", "-r", "--name-only", version.commit).splitlines()
    return {n: git_show(root, f"{version.commit}:{n}") for n in names if n != "version.json"}


__all__ = ["VERSION_BRANCH", "TAG_PREFIX", "DVC_STAGES", "DATA_OUTS", "VersioningError",
           "DataVersion", "git", "git_root", "run_dvc", "dvc_repo", "ensure_dvc",
           "commit_stages", "push", "read_lock",
           "lock_outputs", "set_lock_params", "list_versions", "get_version", "find_version",
           "record_version", "version_files", "fetch_versions"]
