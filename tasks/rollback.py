"""Data versions joined with the model registry: listing, rollback and lineage.

``rollback`` restores a data version's processed data and summary (from the DVC cache or remote)
and moves ``champion`` to the model version trained on it — all or nothing: if any step fails,
the workspace data, ``dvc.lock`` and the aliases are put back as they were.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from tasks.errors import InputError
from tasks.registry import CHAMPION, PREVIOUS, alias_version, client, data_version_id
from tasks.versioning import get_version, git_root, list_versions, restored

VERSION_LOG = "version_log.jsonl"


def _model_versions(tracking_uri: str, name: str) -> list[Any]:
    cl = client(tracking_uri)
    try:
        found = cl.search_model_versions(f"name='{name}'")
    except Exception:  # noqa: BLE001 - no registered model yet
        return []
    # search results carry no aliases: read each version fully
    return sorted((cl.get_model_version(name, mv.version) for mv in found), key=lambda m: int(m.version))


def versions_table(workspace: str | Path, tracking_uri: str, name: str) -> list[dict[str, Any]]:
    """Data versions, oldest first, each with the model versions trained on it."""
    root = git_root(workspace)
    champion = alias_version(tracking_uri, name, CHAMPION)
    champion_id = str(champion.version) if champion is not None else None
    by_data: dict[str, list[dict[str, Any]]] = {}
    for mv in _model_versions(tracking_uri, name):
        tags = dict(mv.tags or {})
        entry = {"version": str(mv.version), "aliases": list(mv.aliases or []),
                 "gate_passed": tags.get("gate.passed"), "gate_reasons": tags.get("gate.reasons"),
                 "champion": str(mv.version) == champion_id}
        by_data.setdefault(data_version_id(tags) or "", []).append(entry)
    rows = []
    for v in list_versions(root):
        row = v.to_json()
        row["model_versions"] = by_data.get(v.id, [])
        row["champion"] = any(m["champion"] for m in row["model_versions"])
        rows.append(row)
    return rows


def _log_event(state_dir: Path, event: dict[str, Any]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / VERSION_LOG).open("a") as fh:
        fh.write(json.dumps(event, sort_keys=True) + "\n")


def rollback(workspace: str | Path, version_id: str, tracking_uri: str, name: str,
             state_dir: str | Path, reason: Optional[str] = None) -> dict[str, Any]:
    """Restore ``version_id``'s data and make the model trained on it the champion (atomically)."""
    root = git_root(workspace)
    version = get_version(root, version_id)
    trained = [mv for mv in _model_versions(tracking_uri, name)
               if data_version_id(dict(mv.tags or {})) == version.id]
    if not trained:
        raise InputError(f"no model version of {name} was trained on data version {version.id} "
                         f"(deleted from the registry?): nothing to make champion")
    passed = [mv for mv in trained if (mv.tags or {}).get("gate.passed") == "true"]
    target = (passed or trained)[-1]
    cl = client(tracking_uri)
    old_champion = alias_version(tracking_uri, name, CHAMPION)
    old_previous = alias_version(tracking_uri, name, PREVIOUS)
    at = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    with restored(root, version):
        try:
            if old_champion is not None and str(old_champion.version) != str(target.version):
                cl.set_registered_model_alias(name, PREVIOUS, old_champion.version)
            cl.set_registered_model_alias(name, CHAMPION, target.version)
            cl.set_model_version_tag(name, target.version, "rollback.at", at)
            cl.set_model_version_tag(name, target.version, "rollback.data_version", version.id)
            cl.set_registered_model_tag(name, "last_rollback", json.dumps(
                {"at": at, "data_version": version.id, "version": str(target.version),
                 "from_version": None if old_champion is None else str(old_champion.version),
                 "by": os.environ.get("USER", "unknown"), "reason": reason}))
        except BaseException:
            # put the aliases back before restored() puts the data back
            if old_champion is not None:
                cl.set_registered_model_alias(name, CHAMPION, old_champion.version)
            else:
                _delete_alias(cl, name, CHAMPION)
            if old_previous is not None:
                cl.set_registered_model_alias(name, PREVIOUS, old_previous.version)
            else:
                _delete_alias(cl, name, PREVIOUS)
            raise
    event = {"event": "rollback", "at": at, "data_version": version.id,
             "champion": str(target.version),
             "from_champion": None if old_champion is None else str(old_champion.version),
             "reason": reason}
    _log_event(Path(state_dir), event)
    return event


def _delete_alias(cl: Any, name: str, alias: str) -> None:
    try:
        cl.delete_registered_model_alias(name, alias)
    except Exception:  # noqa: BLE001 - alias absent
        pass


def lineage(tracking_uri: str, model_uri: str) -> dict[str, Any]:
    """Lineage tags of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    if not model_uri.startswith("models:/"):
        raise InputError(f"{model_uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    ref = model_uri[len("models:/"):]
    cl = client(tracking_uri)
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = cl.get_model_version_by_alias(name, alias)
        else:
            name, version = ref.rsplit("/", 1)
            mv = cl.get_model_version(name, version)
    except Exception as exc:  # noqa: BLE001 - MLflow's not-found errors
        raise InputError(f"{model_uri}: not found in the registry ({type(exc).__name__})") from None
    tags = dict(mv.tags or {})
    return {"model_uri": model_uri, "name": mv.name, "version": str(mv.version), "run_id": mv.run_id,
            "aliases": list(mv.aliases or []), "data_version": data_version_id(tags),
            "tags": {k: v for k, v in sorted(tags.items())}}
