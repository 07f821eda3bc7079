"""Data versions joined with the registry: listing, lineage, and a rollback that can be trusted.

``rollback(params, "vN")`` restores data version vN — the input snapshot, processed data,
summary, model and reports it recorded, and its ``dvc.lock`` — and makes a model trained on that
data the champion:

1. **only what passed**: the target is a version trained on vN's data whose gates passed (never
   an ``incomplete`` one). When there is none, ∞-AE is refitted on vN's data with vN's params
   (the fit stage's code), registered, and gated against the current champion; a failing verdict
   refuses the rollback (nothing changed) unless ``force`` with a ``reason``, which is recorded.
2. **verified**: every file is rebuilt from the DVC cache into a staging folder and its MD5
   checked against the hash vN recorded; a missing or corrupt cache object is (re-)fetched from
   the DVC remote, and if no intact copy exists the rollback fails with one line, nothing changed.
3. **atomic under kill -9**: a journal (``<state_dir>/rollback.journal.json``) is written before
   the first visible change; files are swapped by rename with the old ones kept; the alias move
   is the commit point. The next command (:func:`recover_interrupted`, called by every writer
   under the lock) undoes an uncommitted rollback — data, ``dvc.lock``, reports and aliases all
   back at the old version — or finishes a committed one, and removes the staging folder.

The caller holds the writer lock (:func:`tasks.concurrency.writer_lock`).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import yaml

from tasks import registry
from tasks.dvc import DataVersion, get_version, git_root, list_versions, version_files
from tasks.errors import InputError
from tasks.io import write_json
from tasks.params import Params, parse_params
from tasks.runtime import fault_point, say

VERSION_LOG = "version_log.jsonl"
JOURNAL = "rollback.journal.json"
STAGING_PREFIX = ".restore-"


class RestoreError(InputError):
    """A version's data cannot be restored intact (one line; nothing was changed)."""


# -- the DVC cache ------------------------------------------------------------------------------
def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Cache:
    """Read access to a workspace's DVC cache, fetching from its remote what is missing."""

    def __init__(self, root: Path) -> None:
        from dvc.repo import Repo

        self.root = root
        self.repo = Repo(str(root))
        self.odb = self.repo.cache.local

    def close(self) -> None:
        self.repo.close()

    def path(self, md5: str) -> Path:
        return Path(self.odb.oid_to_path(md5))

    def fetch(self, md5s: list[str]) -> None:
        from dvc_data.hashfile.hash_info import HashInfo

        try:
            self.repo.cloud.pull([HashInfo("md5", m) for m in md5s])
        except Exception as exc:  # noqa: BLE001 - no remote, remote unreachable, …
            raise RestoreError(f"cannot fetch from the DVC remote: "
                               f"{(str(exc).splitlines() or [type(exc).__name__])[0]}") from None

    def intact(self, md5: str) -> bool:
        """The object exists and its content has its name (``.dir`` listings: the JSON text)."""
        path = self.path(md5)
        return path.is_file() and _md5(path) == md5.removesuffix(".dir")

    def ensure(self, md5s: list[str], what: str) -> None:
        """Every object intact in the cache: corrupt ones removed and re-fetched, missing ones
        fetched; a :class:`RestoreError` naming ``what`` when no intact copy exists."""
        bad = [m for m in md5s if not self.intact(m)]
        if not bad:
            return
        for m in bad:
            if self.path(m).exists():
                os.chmod(self.path(m), 0o644)
                self.path(m).unlink()  # corrupt: the remote's copy replaces it
        self.fetch(bad)
        still = [m for m in bad if not self.intact(m)]
        if still:
            raise RestoreError(f"{what}: no intact copy of DVC object {still[0]} in the cache or "
                               f"on the remote ({len(still)} object(s) missing or corrupt)")

    def materialise(self, md5: str, dest: Path, what: str) -> None:
        """Write the file or directory with hash ``md5`` at ``dest``, verified."""
        if md5.endswith(".dir"):
            self.ensure([md5], what)
            entries = json.loads(self.path(md5).read_text())
            self.ensure([e["md5"] for e in entries], what)
            dest.mkdir(parents=True)
            for e in entries:
                target = dest / e["relpath"]
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.path(e["md5"]), target)
                if _md5(target) != e["md5"]:
                    raise RestoreError(f"{what}: {e['relpath']} changed while being restored")
        else:
            self.ensure([md5], what)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.path(md5), dest)
            if _md5(dest) != md5:
                raise RestoreError(f"{what}: changed while being restored")


@contextmanager
def open_cache(root: Path) -> Iterator[Cache]:
    cache = Cache(root)
    try:
        yield cache
    finally:
        cache.close()


def lock_cached_outs(lock_text: str) -> dict[str, str]:
    """``{path: md5}`` of the DVC-cached outputs recorded in a dvc.lock."""
    lock = yaml.safe_load(lock_text) or {}
    outs = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            outs[out["path"]] = out["md5"]
    return outs


# -- listing and lineage --------------------------------------------------------------------------
def versions_table(params: Params) -> list[dict[str, Any]]:
    """Data versions, oldest first, each with the model versions trained on it."""
    root = git_root(Path(params.versioning.workspace).expanduser())
    uri, name = params.tracking_uri(), params.registry.model_name
    champion = registry.alias_version(uri, name, registry.CHAMPION)
    champion_id = str(champion.version) if champion is not None else None
    by_data: dict[str, list[dict[str, Any]]] = {}
    for mv in registry.model_versions(uri, name):
        tags = dict(mv.tags or {})
        entry = {"version": str(mv.version), "aliases": list(mv.aliases or []),
                 "gate_passed": tags.get("gate.passed"), "state": tags.get(registry.STATE_TAG),
                 "gate_reasons": tags.get("gate.reasons"),
                 "champion": str(mv.version) == champion_id}
        by_data.setdefault(tags.get("data_version") or "", []).append(entry)
    rows = []
    for v in list_versions(root):
        row = v.to_json()
        row["input"] = (v.info or {}).get("input")
        row["catalogue"] = (v.info or {}).get("catalogue")
        row["model_versions"] = by_data.get(v.id, [])
        row["champion"] = any(m["champion"] for m in row["model_versions"])
        rows.append(row)
    return rows


def lineage(params: Params, model_uri: str) -> dict[str, Any]:
    """Everything a model version came from: input file hash, data version, summary hash, params
    hash, code commit, flow run, MLflow run, aliases and gate verdict."""
    if not model_uri.startswith("models:/"):
        raise InputError(f"{model_uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    ref = model_uri[len("models:/"):]
    uri = params.tracking_uri()
    if "@" in ref:
        name, alias = ref.split("@", 1)
        mv = registry.alias_version(uri, name, alias)
        if mv is None:
            raise InputError(f"{model_uri}: no such alias in the registry")
    else:
        name, _, version = ref.rpartition("/")
        mv = registry.get_version(uri, name, version)
    tags = dict(mv.tags or {})
    return {
        "model_uri": model_uri, "name": mv.name, "version": str(mv.version),
        "aliases": list(mv.aliases or []),
        "input": {"source": tags.get("input_source"), "sha256": tags.get("input_sha256")},
        "data_version": tags.get("data_version"), "data_hash": tags.get("data_hash"),
        "catalogue": tags.get("catalogue"), "summary_hash": tags.get("summary_hash"), "params_hash": tags.get("params_hash"),
        "git_commit": tags.get("git_commit"), "prefect_flow_run_id": tags.get("prefect_flow_run_id"),
        "mlflow_run_id": mv.run_id,
        "gate": {"passed": tags.get("gate.passed"), "metric": tags.get("gate.metric"),
                 "reasons": (tags.get("gate.reasons") or "").splitlines(),
                 "state": tags.get(registry.STATE_TAG), "promoted": tags.get("promoted")},
        "refit": tags.get("refit"),
    }


# -- staging a version ----------------------------------------------------------------------------
def stage_version(root: Path, version: DataVersion, staging: Path,
                  only: Optional[list[str]] = None,
                  hook: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Rebuild vN's files under ``staging`` (same relative paths as in the workspace), verified:
    its DVC-cached outputs from the cache/remote, and its record's files (dvc.lock, reports)."""
    files = version_files(root, version)
    if "dvc.lock" not in files:
        raise RestoreError(f"data version {version.id}: its record has no dvc.lock")
    lock_text = files["dvc.lock"].decode()
    # the metrics and plots (cache: false) come from the record itself, the rest from the cache
    outs = {p: m for p, m in lock_cached_outs(lock_text).items() if p not in files}
    if only is not None:
        outs = {p: m for p, m in outs.items() if any(p.endswith(o) for o in only)}
    with open_cache(root) as cache:
        for n, (path, md5) in enumerate(sorted(outs.items())):
            cache.materialise(md5, staging / path, f"data version {version.id} {path}")
            if n == 0:
                hook("fetch")  # midway through the restore
    for rel, data in files.items():
        if rel != "dvc.lock":
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(data)
    return {"lock": lock_text, "outs": sorted(outs), "files": sorted(r for r in files
                                                                      if r != "dvc.lock")}


def version_params(version: DataVersion, staging: Path, root: Path) -> Params:
    """vN's effective params with its state/reports folders moved under ``staging``."""
    used = dict((version.info or {}).get("params") or {})
    if not used:
        raise RestoreError(f"data version {version.id}: its record has no params (made by an "
                           "older infrec): it cannot be refitted")
    state_rel = _state_rel(version)
    used["state_dir"] = str(staging / state_rel)
    reports_rel = os.path.relpath(used.get("reports_dir") or "reports", root) if os.path.isabs(
        used.get("reports_dir") or "") else (used.get("reports_dir") or "reports")
    used["reports_dir"] = str(staging / reports_rel)
    used["versioning"] = {**(used.get("versioning") or {}), "enabled": False}
    return parse_params(used, f"data version {version.id} params")


def _state_rel(version: DataVersion) -> str:
    processed = next(p for p in version.outputs if p.endswith("data/processed"))
    return processed[: -len("/data/processed")]


# -- choosing and making the target -----------------------------------------------------------------
def passed_versions(params: Params, version: DataVersion) -> list[Any]:
    """Model versions trained on ``version``'s data whose gates passed, oldest first."""
    out = []
    for mv in registry.model_versions(params.tracking_uri(), params.registry.model_name):
        tags = mv.tags or {}
        if (tags.get("data_version") == version.id and tags.get("gate.passed") == "true"
                and tags.get(registry.STATE_TAG) != registry.INCOMPLETE):
            out.append(mv)
    return out


def _refit(params: Params, version: DataVersion, staged_params: Params,
           log: Callable[[str], None], force: bool, reason: Optional[str]) -> tuple[str, Any, Optional[str]]:
    """Refit on the staged data and gate it against the champion; register it only when it
    passes (or is forced): ``(version, verdict, forced_by)``. A failing refit without ``force``
    raises the refusal — nothing is registered or moved."""
    from tasks import fit, promote, register
    from tasks.data import load_dataset
    from tasks.evaluate import summarise
    from tasks.gates import evaluated_users
    from tasks.io import read_json

    metric = staged_params.selection.metric
    fitted = fit.run(staged_params, log=log)
    paths = staged_params.paths()
    evaluation = read_json(paths.evaluation, f"data version {version.id} evaluation")
    evaluation = {k: v for k, v in evaluation.items() if k != "summary"}
    evaluation["candidate"] = read_json(paths.model / "metrics.json", "the refit's metrics")
    evaluation = {"summary": summarise(evaluation, metric), **evaluation}
    write_json(paths.evaluation, evaluation)
    dataset = load_dataset(paths.processed)
    champion = promote.champion_comparison(params, None, dataset, dataset.data_version)
    verdict = promote.decide(params, evaluation, champion, evaluated_users(dataset))
    log(f"refitted on {version.id}: test {metric} {fitted['test'][metric]:.2f}; gates "
        f"{'PASS' if verdict.passed else 'FAIL'}")
    if not verdict.passed and not force:
        raise InputError(f"rollback to {version.id} refused: no gate-passed model was trained on "
                         f"it and the refitted one fails its gates ({'; '.join(verdict.failures)})"
                         "; nothing changed (use --force --reason ... to override)")
    forced_by = None if verdict.passed else _who()
    # the registry is the live one: the staged params only move where the files are read
    registry.configure(params.tracking_uri(), params.registry.experiment,
                       params.state_path() / "mlartifacts")
    live = staged_params.model_copy(update={"registry": params.registry,
                                            "tracking": params.tracking})
    registered = register.run(live, {"version": {"version": version.id,
                                                 "hashes": version.hashes()},
                                     "input": (version.info or {}).get("input")}, log=log,
                               champion_only=True)
    if registered["unchanged"]:
        return registered["version"], verdict, forced_by
    registry.set_version_tags(params.tracking_uri(), params.registry.model_name,
                              registered["version"], {"refit": f"rollback to {version.id}"})
    promote.record_verdict(params, registered["version"], verdict, registered["run_id"],
                           forced_by=forced_by, force_reason=reason if forced_by else None)
    return registered["version"], verdict, forced_by


def name_version(params: Params, version: str) -> str:
    return f"{params.registry.model_name} v{version}"


def _who() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001
        return "unknown"


# -- the swap, with a journal ---------------------------------------------------------------------
def _journal_path(params: Params) -> Path:
    return params.state_path() / JOURNAL


def _swap_in(root: Path, staging: Path, backup: Path, rels: list[str],
             hook: Callable[[str], None] = lambda _m: None) -> None:
    """Move each workspace path aside into ``backup`` and the staged one into place."""
    for n, rel in enumerate(rels):
        if n == len(rels) // 2:
            hook("checkout-midway")
        live, staged, old = root / rel, staging / rel, backup / rel
        old.parent.mkdir(parents=True, exist_ok=True)
        if live.exists() or live.is_symlink():
            os.replace(live, old)
        live.parent.mkdir(parents=True, exist_ok=True)
        _move(staged, live)


def _move(src: Path, dst: Path) -> None:
    try:
        os.replace(src, dst)
    except OSError:  # another file system: copy, then remove
        if src.is_dir():
            shutil.copytree(src, dst)
            shutil.rmtree(src)
        else:
            shutil.copy2(src, dst)
            src.unlink()


def _undo_files(root: Path, backup: Path, rels: list[str]) -> None:
    for rel in rels:
        live, old = root / rel, backup / rel
        if old.exists() or old.is_symlink():
            if live.is_dir() and not live.is_symlink():
                shutil.rmtree(live)
            elif live.exists() or live.is_symlink():
                live.unlink()
            _move(old, live)
        elif (backup / ".absent" / rel).exists():  # the path did not exist before
            if live.is_dir() and not live.is_symlink():
                shutil.rmtree(live)
            elif live.exists():
                live.unlink()


def _restore_aliases(params: Params, before: dict[str, Optional[str]]) -> None:
    uri, name = params.tracking_uri(), params.registry.model_name
    for alias in registry.ALIASES:
        registry.set_alias(uri, name, alias, before.get(alias))


def recover_interrupted(params: Params, log: Optional[Callable[[str], None]] = None
                        ) -> Optional[str]:
    """Undo (or finish) a rollback a crash interrupted; remove stray staging folders. Returns
    what was done. Call it holding the writer lock."""
    log = log or say()
    journal_file = _journal_path(params)
    done = None
    if journal_file.is_file():
        try:
            journal = json.loads(journal_file.read_text())
        except (OSError, json.JSONDecodeError):
            journal = None
        if journal is not None:
            root, backup = Path(journal["root"]), Path(journal["backup"])
            if journal.get("phase") == "committed":
                done = f"finished the rollback to {journal['version']}"
            else:
                _undo_files(root, backup, journal["paths"])
                _restore_aliases(params, journal["aliases"])
                done = f"undid the interrupted rollback to {journal['version']}"
            shutil.rmtree(journal["staging"], ignore_errors=True)
        journal_file.unlink(missing_ok=True)
    state = params.state_path()
    if state.is_dir():
        for stray in state.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(stray, ignore_errors=True)
    if done:
        log(done)
    return done


def _log_event(state_dir: Path, event: dict[str, Any]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / VERSION_LOG).open("a") as fh:
        fh.write(json.dumps(event, sort_keys=True) + "\n")


def rollback(params: Params, version_id: str, reason: Optional[str] = None, *,
             force: bool = False, log: Optional[Callable[[str], None]] = None,
             _hook: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Restore data version ``version_id`` and its gate-passed champion (see the module doc).
    ``_hook(moment)`` is called at the moments a fault-injection test kills the process."""
    log = log or say()
    hook = _hook or (lambda moment: fault_point(f"rollback-{moment}"))
    if force and not (reason and reason.strip()):
        raise InputError("--force needs --reason (it is recorded with who forced the rollback)")
    root = git_root(Path(params.versioning.workspace).expanduser())
    version = get_version(root, version_id)
    uri, name = params.tracking_uri(), params.registry.model_name
    before = {alias: registry.alias_version(uri, name, alias) for alias in registry.ALIASES}
    before_ids = {a: (str(mv.version) if mv is not None else None) for a, mv in before.items()}
    state = params.state_path()
    state.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{version.id}-", dir=state))
    try:
        staged = stage_version(root, version, staging / "ws", hook=hook)
        candidates = passed_versions(params, version)
        refitted, forced_by, verdict = False, None, None
        if candidates:
            own = [mv for mv in candidates if (mv.tags or {}).get("prefect_flow_run_id")
                   == (version.info or {}).get("flow_run_id")]
            target = str((own or candidates)[-1].version)
        else:
            log(f"no gate-passed model version was trained on {version.id}: refitting ∞-AE on it")
            staged_params = version_params(version, staging / "ws", root)
            target, verdict, forced_by = _refit(params, version, staged_params, log, force, reason)
            refitted = True
        restored = _stage_params(root, version, staged["lock"], staging / "ws")
        rels = (staged["outs"] + staged["files"] + ["dvc.lock"]
                + (["params.yaml"] if restored else []))
        (staging / "ws" / "dvc.lock").write_text(staged["lock"])
        backup = staging / "old"
        for rel in rels:  # remember which paths did not exist, so an undo removes them
            if not (root / rel).exists():
                (backup / ".absent" / rel).parent.mkdir(parents=True, exist_ok=True)
                (backup / ".absent" / rel).touch()
        journal = {"version": version.id, "root": str(root), "staging": str(staging),
                   "backup": str(backup), "paths": rels, "aliases": before_ids,
                   "target": target, "phase": "swapping"}
        write_json(_journal_path(params), journal)
        _swap_in(root, staging / "ws", backup, rels, hook)
        hook("aliases")
        if before_ids[registry.CHAMPION] != target:
            registry.move_aliases(uri, name, target, promote=True)
        registry.set_version_tags(uri, name, target, {
            "promoted": "true", registry.STATE_TAG: registry.DECIDED,
            "rollback.data_version": version.id,
            "rollback.at": datetime.now(timezone.utc).replace(microsecond=0).isoformat()})
        write_json(_journal_path(params), {**journal, "phase": "committed"})
    except BaseException:
        journal_file = _journal_path(params)
        if journal_file.is_file():
            recover_interrupted(params, log=lambda _m: None)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log_changed = _repoint_log(params, root, version)
    at = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    event = {"event": "rollback", "at": at, "data_version": version.id, "champion": target,
             "refitted": refitted, "from_champion": before_ids[registry.CHAMPION],
             "reason": reason, "by": _who(), "forced": forced_by is not None,
             "params_restored": restored, "log_changed": log_changed}
    registry.client(uri).set_registered_model_tag(name, "last_rollback", json.dumps(event))
    _log_event(state, event)
    _journal_path(params).unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    return event


# what a rollback restores of params.yaml: every key of the sections that decide what the pipeline
# computes and judges; where and how it runs (state_dir, reports_dir, registry, tracking,
# schedule, versioning, serving) stays as the workspace has it
RESTORED_SECTIONS = ("generate", "ingest", "selection", "distill", "fit", "evaluate", "gates")


def _stage_params(root: Path, version: DataVersion, lock_text: str, staging: Path) -> list[str]:
    """A copy of the workspace's params.yaml under ``staging`` with vN's values of
    :data:`RESTORED_SECTIONS` (layout and comments kept; ``ingest.input`` spelt as vN's dvc.lock
    records it); the keys it changed (none: no copy)."""
    from tasks.dvc import _same_value
    from tasks.params import set_in_file

    live, used = root / "params.yaml", (version.info or {}).get("params") or {}
    if not live.is_file() or not used:
        return []
    current = yaml.safe_load(live.read_text()) or {}
    defaults = Params().to_dict()
    recorded: dict[str, Any] = {}
    for stage in ((yaml.safe_load(lock_text) or {}).get("stages") or {}).values():
        recorded.update((stage.get("params") or {}).get("params.yaml") or {})
    staged = staging / "params.yaml"
    staged.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(live, staged)
    changed = []
    for section in RESTORED_SECTIONS:
        for key, value in (used.get(section) or {}).items():
            if (section, key) == ("ingest", "input") and isinstance(recorded.get("ingest"), dict):
                value = recorded["ingest"].get("input", value)
            now_section = current.get(section) or {}
            now = now_section[key] if key in now_section else (defaults.get(section) or {}).get(key)
            if _same_value(now, value):
                continue
            set_in_file(staged, f"{section}.{key}", value)
            changed.append(f"{section}.{key}")
    if not changed:
        staged.unlink()
    return changed


def _repoint_log(params: Params, root: Path, version: DataVersion) -> Optional[str]:
    """Point ``<state_dir>/log`` (the ingest stage's DVC dep) at the restored params' input; the
    input's path when its content is no longer vN's input (DVC then shows ingest changed)."""
    from tasks.ingest import link_log
    from tasks.io import sha256_file
    from tasks.params import load_params

    ws = load_params(root / "params.yaml") if (root / "params.yaml").is_file() else params
    if ws.ingest.input is None:
        target = params.paths().generated
    else:
        given = Path(ws.ingest.input).expanduser()
        target = (given if given.is_absolute() else root / given).resolve()
    link_log(params.paths().log, target)
    want = ((version.info or {}).get("input") or {}).get("sha256")
    if want and target.is_file() and sha256_file(target) != want:
        return str(target)
    return None


def champion_history_dir(params: Params, data_version: str, dest: Path) -> Path:
    """vN's processed data rebuilt (verified) under ``dest``: the history the champion was
    trained on, without touching the workspace."""
    root = git_root(Path(params.versioning.workspace).expanduser())
    version = get_version(root, data_version)
    stage_version(root, version, dest, only=["data/processed"])
    return dest / next(p for p in lock_cached_outs(version_files(root, version)["dvc.lock"]
                                                   .decode()) if p.endswith("data/processed"))


__all__ = ["rollback", "versions_table", "lineage", "recover_interrupted", "stage_version",
           "champion_history_dir", "passed_versions", "RestoreError"]
