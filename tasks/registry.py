"""MLflow access: tracking, the model registry and its aliases — the one place that talks to it.

* runs: :func:`log_run` (params, metrics, metric histories, tags, artifacts, the pyfunc model);
* versions: :func:`register`, :func:`model_versions`, :func:`version_info`, :func:`alias_version`;
* aliases: :func:`move_aliases` — the one alias mover (pipeline promotion, ``infrec promote``,
  rollback). The aliases are the source of truth for which version serves: ``champion`` (the
  served one), ``previous`` (the one it replaced), ``challenger`` (the latest rejected one). Tags
  record facts that stay true whatever happens next (the gate verdict), and ``promoted`` is
  written only after ``champion`` has moved.

MLflow metric names may not contain ``@``: ``val/ndcg_at_10`` (:func:`metric_key`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from tasks.errors import InputError
from tasks.params import redact
from tasks.runtime import fault_point, process_tags

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"
ALIASES = (CHAMPION, PREVIOUS, CHALLENGER)
# version tags: lifecycle state of a version (a crash between registration and the verdict leaves
# "registered"; the next start marks such versions incomplete — never eligible for champion)
STATE_TAG, REGISTERED, DECIDED, INCOMPLETE = "infrec.state", "registered", "decided", "incomplete"
# files a pipeline run rewrites in the tracked tree: their changes do not make the code "dirty"
PIPELINE_OUTPUTS = ("dvc.lock", "reports/", "params.yaml")


# -- names -------------------------------------------------------------------------------------
def metric_key(*parts: str) -> str:
    """``("val", "ndcg@10")`` → ``"val/ndcg_at_10"`` (MLflow refuses ``@``)."""
    return "/".join(p.replace("@", "_at_") for p in parts)


def metric_name(key_part: str) -> str:
    """``"ndcg_at_10"`` → ``"ndcg@10"``."""
    return key_part.replace("_at_", "@")


def flatten(prefix: str, obj: Any) -> dict[str, Any]:
    """Nested dict → ``{"a.b": value}`` (lists kept as their JSON text)."""
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    if isinstance(obj, (list, tuple)):
        return {prefix: json.dumps(list(obj))}
    return {prefix: obj}


def git_commit(cwd: str | Path | None = None) -> str:
    """HEAD of the code that runs, with ``+dirty`` when the user's tracked files changed
    (the files a run itself rewrites — :data:`PIPELINE_OUTPUTS` — do not count); ``unknown``
    outside git. ``cwd`` defaults to the directory holding this package."""
    cwd = Path(__file__).resolve().parents[1] if cwd is None else cwd
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=cwd, capture_output=True, text=True, timeout=10)
        changed = [line[3:] for line in status.stdout.splitlines() if line.strip()]
        dirty = [p for p in changed if not p.startswith(PIPELINE_OUTPUTS)]
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# -- connection --------------------------------------------------------------------------------
def client(tracking_uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _use(tracking_uri: str) -> None:
    import mlflow

    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    if redact(tracking_uri) != tracking_uri:
        # MLflow prints "View run … at: <tracking URI>" when a run ends: not with credentials in it
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)


def configure(tracking_uri: str, experiment: str, artifact_root: str | Path | None = None) -> str:
    """Point MLflow at ``tracking_uri`` (tracking + registry); create the experiment if needed
    (local stores: with ``artifact_root`` as its artifact location). Returns its id."""
    _use(tracking_uri)
    cl = client(tracking_uri)
    exp = cl.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    remote = tracking_uri.startswith(("http://", "https://", "databricks"))
    if artifact_root is not None and not remote:
        Path(artifact_root).mkdir(parents=True, exist_ok=True)
        location = Path(artifact_root).resolve().as_uri()
    try:
        return cl.create_experiment(experiment, artifact_location=location)
    except Exception:  # noqa: BLE001 - created concurrently by another process
        exp = cl.get_experiment_by_name(experiment)
        if exp is None:
            raise
        return exp.experiment_id


# -- runs --------------------------------------------------------------------------------------
def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def log_run(*, tracking_uri: str, experiment: str, artifact_root: str | Path | None,
            run_name: str, description: str, params: Mapping[str, Any],
            metrics: Mapping[str, float], histories: Mapping[str, list[tuple[int, float]]],
            tags: Mapping[str, str], files: Iterable[tuple[str, str | Path]],
            log_model: Any) -> dict[str, str]:
    """One MLflow run: params, metrics, histories, ``(artifact_dir, path)`` files, then
    ``log_model()`` (returns the ``ModelInfo``). Returns ``{"run_id", "model_uri"}``.

    The run is ended ``FAILED`` on any exception (never left ``RUNNING``; a SIGKILL leaves it
    RUNNING, which :func:`mark_stale_runs` repairs at the next start)."""
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    exp_id = configure(tracking_uri, experiment, artifact_root)
    cl = client(tracking_uri)
    run = cl.create_run(exp_id, run_name=run_name,
                        tags={"mlflow.note.content": description, **process_tags()})
    run_id = run.info.run_id
    try:
        now = int(run.info.start_time)
        flat = [Param(k, redact(str(v))[:6000]) for k, v in params.items()]
        points = {(k, 0): float(v) for k, v in metrics.items() if _finite(v)}
        for k, pts in histories.items():  # one value per (key, step)
            points.update({(k, int(s)): float(v) for s, v in pts if _finite(v)})
        ms = [Metric(k, v, now, s) for (k, s), v in points.items()]
        ts = [RunTag(k, redact(str(v))) for k, v in tags.items()]
        for j in range(0, len(flat), 100):  # log_batch: ≤ 100 params/tags, ≤ 1000 metrics
            cl.log_batch(run_id, params=flat[j : j + 100])
        for j in range(0, len(ts), 100):
            cl.log_batch(run_id, tags=ts[j : j + 100])
        for j in range(0, len(ms), 1000):
            cl.log_batch(run_id, metrics=ms[j : j + 1000])
        for art_dir, path in files:
            if Path(path).exists():
                cl.log_artifact(run_id, str(path), artifact_path=art_dir)
        with mlflow.start_run(run_id=run_id):
            fault_point("model-logging")
            info = log_model()
    except BaseException as exc:  # a stop (SIGTERM, Ctrl-C, a cancellation) ends it KILLED
        from tasks import stop

        stopped = isinstance(exc, stop.Interrupted) or stop.requested()
        cl.set_terminated(run_id, status="KILLED" if stopped else "FAILED")
        raise
    cl.set_terminated(run_id, status="FINISHED")
    return {"run_id": run_id, "model_uri": info.model_uri}


def register(tracking_uri: str, model_uri: str, name: str, tags: Mapping[str, str]) -> str:
    """Register ``model_uri`` as a new version of ``name`` (state ``registered``)."""
    import mlflow

    _use(tracking_uri)
    all_tags = {**{k: redact(str(v)) for k, v in tags.items()}, STATE_TAG: REGISTERED,
                **process_tags()}
    mv = mlflow.register_model(model_uri, name, tags=all_tags)
    return str(mv.version)


def set_run_outcome(tracking_uri: str, run_id: str, *, name: str, tags: Mapping[str, str],
                    metrics: Mapping[str, float], description: str) -> None:
    cl = client(tracking_uri)
    for k, v in tags.items():
        cl.set_tag(run_id, k, redact(str(v))[:7900])
    cl.set_tag(run_id, "mlflow.note.content", description)
    for k, v in metrics.items():
        if _finite(v):
            cl.log_metric(run_id, k, float(v))


def download(tracking_uri: str, run_id: str, artifact: str, dst: str | Path) -> Path:
    import mlflow

    _use(tracking_uri)
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact,
                                                    dst_path=str(dst)))


# -- registry queries ------------------------------------------------------------------------
def alias_version(tracking_uri: str, name: str, alias: str):
    """The ModelVersion an alias points to, or None (also when the model does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        return client(tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def aliases(tracking_uri: str, name: str) -> dict[str, str]:
    """``{alias: version}`` of the model's aliases."""
    out = {}
    for alias in ALIASES:
        mv = alias_version(tracking_uri, name, alias)
        if mv is not None:
            out[alias] = str(mv.version)
    return out


def model_versions(tracking_uri: str, name: str) -> list[Any]:
    """Every version of ``name``, oldest first, with aliases and tags (search results carry no
    aliases, so each is read fully)."""
    from mlflow.exceptions import MlflowException

    cl = client(tracking_uri)
    try:
        found = cl.search_model_versions(f"name='{name}'")
    except MlflowException:
        return []
    return sorted((cl.get_model_version(name, mv.version) for mv in found),
                  key=lambda m: int(m.version))


def get_version(tracking_uri: str, name: str, version: str):
    try:
        return client(tracking_uri).get_model_version(name, str(version))
    except Exception:  # noqa: BLE001 - MlflowException: no such model / version
        raise InputError(f"{name} version {version}: not found in the registry "
                         f"({redact(tracking_uri)})") from None


def latest_version(tracking_uri: str, name: str) -> Optional[str]:
    versions = model_versions(tracking_uri, name)
    return str(versions[-1].version) if versions else None


def run_metrics(tracking_uri: str, run_id: str, prefix: str = "test") -> dict[str, float]:
    """``{"ndcg@10": …}`` from a run's ``<prefix>/…`` metrics (latest values)."""
    data = client(tracking_uri).get_run(run_id).data
    head = prefix + "/"
    return {metric_name(k[len(head):]): v for k, v in data.metrics.items()
            if k.startswith(head) and "/" not in k[len(head):]}


def data_version_id(tags: Mapping[str, str]) -> Optional[str]:
    """The data version a model was trained on, as ``infrec versions`` names it (``vN``), or the
    processed data's content hash when the run was not versioned."""
    return tags.get("data_version") or tags.get("data_hash")


def version_info(tracking_uri: str, name: str, version: str) -> dict[str, Any]:
    """Version, aliases, tags, data version, val/test metrics and run id of one model version."""
    mv = get_version(tracking_uri, name, version)
    tags = dict(mv.tags or {})
    out: dict[str, Any] = {
        "version": str(mv.version), "run_id": mv.run_id, "aliases": list(mv.aliases or []),
        "tags": tags, "data_version": data_version_id(tags), "created": mv.creation_timestamp,
        "val": {}, "test": {},
    }
    if mv.run_id:
        try:
            out["val"] = run_metrics(tracking_uri, mv.run_id, "val")
            out["test"] = run_metrics(tracking_uri, mv.run_id, "test")
        except Exception:  # noqa: BLE001 - run deleted: the version still exists
            pass
    return out


def load_version_model(tracking_uri: str, model_uri: str):
    """``(InfAE, item_ids, info)`` of a registered pyfunc (e.g. ``models:/NAME/3``); an
    :class:`InputError` (one line) when its artifacts cannot be loaded."""
    import mlflow

    _use(tracking_uri)
    try:
        inner = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - missing/corrupt artifacts: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise InputError(f"{model_uri}: cannot be loaded ({first[:300]})") from None
    return inner.model, inner.item_ids, inner.info


# -- aliases: the one mover ----------------------------------------------------------------------
def set_alias(tracking_uri: str, name: str, alias: str, version: Optional[str]) -> None:
    """Point ``alias`` at ``version`` (None: remove it)."""
    cl = client(tracking_uri)
    if version is None:
        try:
            cl.delete_registered_model_alias(name, alias)
        except Exception:  # noqa: BLE001 - alias absent
            pass
    else:
        cl.set_registered_model_alias(name, alias, str(version))


def move_aliases(tracking_uri: str, name: str, version: str, promote: bool) -> dict[str, Any]:
    """Promote ``version`` (``previous`` ← old champion first, so a crash midway leaves the
    champion where it was; then ``champion`` ← version; a ``challenger`` alias on it is removed),
    or make it the ``challenger``. Returns ``{"promoted", "champion", "previous"}``."""
    version = str(version)
    old = alias_version(tracking_uri, name, CHAMPION)
    old_version = str(old.version) if old is not None else None
    if not promote:
        set_alias(tracking_uri, name, CHALLENGER, version)
        return {"promoted": False, "champion": old_version, "previous": None}
    if old_version is not None and old_version != version:
        set_alias(tracking_uri, name, PREVIOUS, old_version)
    fault_point("alias-move")  # previous moved, champion not yet
    set_alias(tracking_uri, name, CHAMPION, version)
    challenger = alias_version(tracking_uri, name, CHALLENGER)
    if challenger is not None and str(challenger.version) == version:
        set_alias(tracking_uri, name, CHALLENGER, None)
    previous = old_version if old_version != version else None
    return {"promoted": True, "champion": version, "previous": previous}


def set_version_tags(tracking_uri: str, name: str, version: str, tags: Mapping[str, str]) -> None:
    cl = client(tracking_uri)
    for k, v in tags.items():
        cl.set_model_version_tag(name, str(version), k, redact(str(v)))


__all__ = [
    "CHAMPION", "PREVIOUS", "CHALLENGER", "metric_key", "metric_name", "flatten", "git_commit",
    "client", "configure", "log_run", "register", "set_run_outcome", "download",
    "alias_version", "aliases", "model_versions", "get_version", "latest_version",
    "run_metrics", "data_version_id", "version_info", "load_version_model", "set_alias",
    "move_aliases", "set_version_tags",
]
