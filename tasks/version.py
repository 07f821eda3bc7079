"""Version stage: DVC-commit and push a run's outputs and record a data version (``tasks.dvc``).

``run(params, lineage)`` — when ``versioning.enabled`` — runs ``dvc commit`` of the dvc.yaml
stages (``ingest``, ``distill``, ``fit``, ``evaluate``: their outputs go to the DVC cache and their
hashes to ``dvc.lock``), writes into ``dvc.lock`` the parameter values the run actually used
(DVC reads the workspace's ``params.yaml``; a run with ``--params other.yaml`` differs), pushes
to the DVC remote, and records a data version unless one with the same data exists: the same
DVC hashes, or the same content — the input's bytes (SHA-256), the processed tables and the
summary — whatever the input file was called (a data version is its content, not a file name). ``check(params)`` is called before any stage runs: versioning
needs a git + DVC workspace whose ``params.yaml`` names the same state and reports folders.

Entry points: :func:`version_task` (the pipeline) and ``infrec version --params params.yaml``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

from prefect import task

from tasks.dvc import (DATA_OUTS, DVC_STAGES, DataVersion, commit_stages, ensure_dvc, git_root,
                       list_versions, push, record_version, set_lock_params)
from tasks.errors import InputError
from tasks.io import write_text
from tasks.params import Params, load_params
from tasks.runtime import fault_point, say, task_options


def workspace(params: Params) -> Path:
    """The git root of ``versioning.workspace`` (which must hold dvc.yaml)."""
    root = git_root(Path(params.versioning.workspace).expanduser())
    if not (root / "dvc.yaml").is_file():
        raise InputError(f"{root}: no dvc.yaml (versioning.workspace must be the project's "
                         "DVC workspace)")
    return root


def _same(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def check(params: Params) -> Optional[Path]:
    """Before any stage: the workspace root when versioning is on (None when off); an
    :class:`InputError` naming what does not fit."""
    if not params.versioning.enabled:
        return None
    root = workspace(params)
    ws = load_params(root / "params.yaml") if (root / "params.yaml").is_file() else Params()
    ws_state = root / ws.state_dir
    if not _same(params.state_path(), ws_state):
        raise InputError(f"state_dir {params.state_path()} is not the workspace's "
                         f"{ws_state} (dvc.yaml's paths come from {root / 'params.yaml'}); "
                         "use the same state_dir, unset INFREC_STATE_DIR, or set "
                         "versioning.enabled: false")
    if not _same(params.reports_path(), root / ws.reports_dir):
        raise InputError(f"reports_dir {params.reports_path()} is not the workspace's "
                         f"{root / ws.reports_dir}")
    return root


def lock_params(params: Params, root: Path) -> dict[str, Any]:
    """The params to record in dvc.lock: the run's values, with paths that resolve to the same
    place as the workspace's params.yaml kept in its spelling (so DVC sees no change)."""
    ws = load_params(root / "params.yaml").to_dict() if (root / "params.yaml").is_file() else {}
    used = params.to_dict()
    for key in ("state_dir", "reports_dir"):
        if key in ws:
            used[key] = ws[key]
    ws_input = (ws.get("ingest") or {}).get("input")
    if ws_input is not None and used["ingest"]["input"] is not None and _same(
            root / ws_input, used["ingest"]["input"]):
        used["ingest"]["input"] = ws_input
    return used


def run(params: Params, lineage: Optional[dict[str, Any]] = None,
        log: Optional[Callable[[str], None]] = None) -> Optional[dict[str, Any]]:
    """Commit, push and record (see the module docstring); None when versioning is off."""
    log = log or say()
    root = check(params)
    if root is None:
        return None
    lineage = lineage or {}
    t0 = time.perf_counter()
    state_rel = os.path.relpath(params.state_path(), root)
    reports_rel = os.path.relpath(params.reports_path(), root)
    ensure_dvc(root, params.state_path() / "dvc-remote")
    commit_stages(root, DVC_STAGES)
    fault_point("dvc-commit")  # committed to the cache, lock params not yet fixed
    lock_path = root / "dvc.lock"
    lock_text = set_lock_params(lock_path.read_text(), lock_params(params, root))
    if lock_text != lock_path.read_text():
        write_text(lock_path, lock_text)
        log("dvc.lock records this run's params (they differ from the workspace's params.yaml)")
    fault_point("dvc-push")
    push(root)
    files = {}
    reports = params.reports_path()
    if reports.is_dir():
        for f in sorted(p for p in reports.rglob("*") if p.is_file()):
            files[f"{reports_rel}/{f.relative_to(reports).as_posix()}"] = f.read_bytes()
    info = {"input": lineage.get("input"), "catalogue": _catalogue(params),
            "content": content_key(params, lineage), "params": params.to_dict(),
            "params_hash": params.section_hash(), "git_commit": lineage.get("git_commit"),
            "flow_run_id": lineage.get("flow_run_id")}
    same = same_content(root, info["content"])
    if same is not None:  # the same bytes, perhaps under another file name
        version, created = same, False
    else:
        version, created = record_version(root, lock_text,
                                          [f"{state_rel}/{p}" for p in DATA_OUTS], info, files)
    note = "new data version" if created else "unchanged data: same data version"
    log(f"{note} {version.id} ({time.perf_counter() - t0:.1f}s): {version.hashes()}")
    return {"version": version.id, "created": created, "commit": version.commit,
            "hashes": version.hashes()}


def processed_data_hash(processed: Path) -> str:
    """The data hash of an ingested folder — as ``tasks.data.Dataset.data_version`` computes it,
    from its manifest's table hashes (never the input's name or path)."""
    import hashlib
    import json

    manifest = json.loads((Path(processed) / "manifest.json").read_text())
    outputs = json.dumps(manifest.get("outputs", {}), sort_keys=True).encode()
    return hashlib.sha256(outputs).hexdigest()[:12]


def content_key(params: Params, lineage: dict[str, Any]) -> dict[str, Any]:
    """What a data version *is*: the input's SHA-256, the processed data's hash, the summary's."""
    from tasks.io import content_hash

    paths = params.paths()
    return {"input_sha256": (lineage.get("input") or {}).get("sha256"),
            "data_hash": processed_data_hash(paths.processed),
            "summary_hash": content_hash(paths.summary)}


def same_content(root: Path, key: dict[str, Any]) -> Optional[DataVersion]:
    """The newest data version recorded with the content ``key`` (None when none, or when the
    key is incomplete)."""
    if not all(key.values()):
        return None
    for v in reversed(list_versions(root, warn=False)):
        if (v.info or {}).get("content") == key:
            return v
    return None


def _catalogue(params: Params) -> str:
    """The fingerprint of the processed data's items (:func:`tasks.gates.catalogue_fingerprint`)."""
    import polars as pl

    from tasks.gates import catalogue_fingerprint

    items = pl.read_parquet(params.paths().processed / "item_map.parquet", columns=["raw_id"])
    return catalogue_fingerprint(items.get_column("raw_id").to_numpy())


@task(name="version", **task_options())
def version_task(params: Params, lineage: dict[str, Any]) -> Optional[dict[str, Any]]:
    return run(params, lineage)


__all__ = ["run", "version_task", "check", "workspace"]
