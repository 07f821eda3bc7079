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


def _refit(root: Path, version: Any, tracking_uri: str, name: str, state_dir: Path,
           experiment: str, depth: int, lambdas: list[float]) -> Any:
    """Fit ∞-AE on the restored processed data + summary of ``version``; register it, tagged."""
    from models.metrics import METRIC_KEYS
    from tasks.data import load_dataset
    from tasks.fit import fit_dataset, save_model
    from tasks.registry import log_run, metric_key, register

    processed = next(p for p in version.outputs if p.endswith("processed"))
    summary = next(p for p in version.outputs if p.endswith(".parquet"))
    dataset = load_dataset(root / processed)
    model, report = fit_dataset(dataset, support_path=root / summary, lambdas=lambdas, depth=depth)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    model_dir = state_dir / "runs" / f"rollback-{version.id}-{stamp}" / "model"
    save_model(model, model_dir, dataset.item_ids, report, dataset.data_version)
    metrics = {metric_key(split, k): report["metrics"][split][k]
               for split in ("val", "test") for k in METRIC_KEYS}
    tags = {"dvc_data_version": version.id, "data_version": dataset.data_version,
            "dvc_hashes": json.dumps({p: o.get("md5") for p, o in version.outputs.items()},
                                     sort_keys=True),
            "refit": f"rollback to {version.id}"}
    logged = log_run(tracking_uri=tracking_uri, experiment=experiment, artifact_root=None,
                     run_name=f"refit-{version.id}", params={"lambda": model.lam, "depth": depth},
                     metrics=metrics, histories={}, tags=tags, files=[], model_dir=model_dir)
    new = register(tracking_uri, logged["model_uri"], name, tags)
    return client(tracking_uri).get_model_version(name, new)


def rollback(workspace: str | Path, version_id: str, tracking_uri: str, name: str,
             state_dir: str | Path, reason: Optional[str] = None, *, experiment: str = "infrec",
             depth: int = 1, lambdas: Optional[list[float]] = None) -> dict[str, Any]:
    """Restore ``version_id``'s data and make the model trained on it the champion (atomically).

    When no model version was trained on that data (deleted from the registry, say), ∞-AE is
    refitted on the restored data and summary and registered first.
    """
    from models.infinite_ae import SUMMARY_LAMBDAS

    root = git_root(workspace)
    version = get_version(root, version_id)
    trained = [mv for mv in _model_versions(tracking_uri, name)
               if data_version_id(dict(mv.tags or {})) == version.id]
    passed = [mv for mv in trained if (mv.tags or {}).get("gate.passed") == "true"]
    target = (passed or trained)[-1] if trained else None
    cl = client(tracking_uri)
    old_champion = alias_version(tracking_uri, name, CHAMPION)
    old_previous = alias_version(tracking_uri, name, PREVIOUS)
    at = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    with restored(root, version):
        if target is None:
            target = _refit(root, version, tracking_uri, name, Path(state_dir), experiment, depth,
                            list(lambdas or SUMMARY_LAMBDAS))
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
             "champion": str(target.version), "refitted": not trained,
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
