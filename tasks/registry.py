"""MLflow tracking and registry: one run per pipeline run, one model version per run, aliases.

Runs log parameters, every val/test metric (``val/ndcg_at_10``…; MLflow names may not contain
``@``), the baselines' and the reference's metrics, the Distill-CF curve (metric history
``distill/<field>`` by step + ``plots/distill_curve.png``), metric versus λ (history
``lambda_path/val/<metric>`` by grid index + ``plots/lambda_path.png`` + the JSON), and the tags
of :data:`LINEAGE_TAGS`. The ∞-AE is logged as a pyfunc from code (:mod:`infrec.pyfunc_model`)
with the model directory as its only artifact, and registered under ``registry.model_name``.

Promotion is by aliases: a version that passes the gates becomes ``champion`` and the version it
replaced becomes ``previous``; a version that fails becomes ``challenger`` and carries the reasons
in its ``gate.reasons`` tag (one gate per line); ``champion`` does not move.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"
LINEAGE_TAGS = ("data_version", "summary_hash", "git_commit", "prefect_flow_run_id", "params_hash",
                "dvc_data_version", "dvc_hashes")


# -- names and hashes --------------------------------------------------------------------------
def metric_key(*parts: str) -> str:
    """``("val", "ndcg@10")`` → ``"val/ndcg_at_10"`` (MLflow refuses ``@``)."""
    return "/".join(p.replace("@", "_at_") for p in parts)


def metric_name(key_part: str) -> str:
    """``"ndcg_at_10"`` → ``"ndcg@10"``."""
    return key_part.replace("_at_", "@")


def file_hash(path: str | Path, length: int = 12) -> str:
    """SHA-256 of a file, or of a directory's files (relative names + contents), shortened."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:length]


def params_hash(params: Mapping[str, Any], length: int = 12) -> str:
    text = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def git_commit(cwd: str | Path | None = None) -> str:
    """HEAD's commit of the code (``+dirty`` when tracked files changed), ``unknown`` outside git.

    ``cwd`` defaults to the directory holding this package (the code that ran), not the working
    directory.
    """
    cwd = Path(__file__).resolve().parents[1] if cwd is None else cwd
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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


# -- connection --------------------------------------------------------------------------------
def configure(tracking_uri: str, experiment: str, artifact_root: str | Path | None = None) -> str:
    """Point MLflow at ``tracking_uri`` (tracking + registry); create the experiment if needed.

    A local SQLite URI gets its directory created; ``artifact_root`` is used only when the
    experiment is created. Returns the experiment id.
    """
    import mlflow

    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    remote = tracking_uri.startswith(("http://", "https://", "databricks"))
    if artifact_root is not None and not remote:
        Path(artifact_root).mkdir(parents=True, exist_ok=True)
        location = Path(artifact_root).resolve().as_uri()
    try:
        return client.create_experiment(experiment, artifact_location=location)
    except Exception:  # noqa: BLE001 - created concurrently by another process
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise
        return exp.experiment_id


def client(tracking_uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


# -- plots ---------------------------------------------------------------------------------------
def plot_lambda_path(lambda_path: list[dict[str, Any]], out_png: str | Path,
                     metrics: Iterable[str] = ("ndcg@10", "hr@100")) -> Path:
    """Validation metrics versus λ (symlog x: the grid contains 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lams = [p["lambda"] for p in lambda_path]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for m in metrics:
        ax.plot(lams, [p.get(m, math.nan) for p in lambda_path], marker="o", label=f"val {m}")
    ax.set_xscale("symlog", linthresh=min([x for x in lams if x > 0] or [1.0]))
    ax.set_xlabel("λ")
    ax.set_ylabel("metric (×100)")
    ax.set_title("∞-AE: validation metrics versus λ")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)


def plot_curve(curve: list[dict[str, Any]], out_png: str | Path, title: str = "Distill-CF") -> Path:
    """The loss and the validation metrics of a per-step log against ``step``, one panel each
    (bookkeeping fields — timings, best-so-far, λ — are left to the metric history)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = sorted({k for r in curve for k, v in r.items()
                      if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})
    fields = [f for f in numeric if f == "loss" or f.startswith("val")] or numeric
    fields = fields[:4] or ["(empty)"]
    fig, axes = plt.subplots(len(fields), 1, figsize=(5, 1.8 * len(fields) + 0.6), squeeze=False)
    for ax, f in zip(axes[:, 0], fields):
        pts = [(r["step"], r[f]) for r in curve
               if isinstance(r.get(f), (int, float)) and "step" in r]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="." if len(pts) < 50 else None)
        ax.set_ylabel(f, fontsize=8)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)


def curve_histories(curve: list[dict[str, Any]],
                    prefix: str = "distill") -> dict[str, list[tuple[int, float]]]:
    """Per-step log rows → ``{"distill/loss": [(step, value), …]}`` (MLflow metric history)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in curve:
        step = r.get("step")
        if not isinstance(step, (int, float)):
            continue
        for k, v in r.items():
            numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
            if k != "step" and numeric and math.isfinite(v):
                out.setdefault(metric_key(prefix, k), []).append((int(step), float(v)))
    return out


# -- logging -----------------------------------------------------------------------------------
def log_run(
    *,
    tracking_uri: str,
    experiment: str,
    artifact_root: str | Path | None,
    run_name: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    histories: Mapping[str, list[tuple[int, float]]],
    tags: Mapping[str, str],
    files: Iterable[tuple[str, str | Path]],
    model_dir: str | Path,
    input_example: Optional[dict[str, Any]] = None,
) -> dict[str, str]:
    """One MLflow run: params, metrics, histories, ``(artifact_dir, path)`` files, the model.

    Returns ``{"run_id", "model_uri", "experiment_id"}``.
    """
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    import infrec.pyfunc_model as pyfunc_model

    exp_id = configure(tracking_uri, experiment, artifact_root)
    cl = client(tracking_uri)
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name) as run:
        run_id = run.info.run_id
        now = int(run.info.start_time)
        flat = [Param(k, str(v)[:6000]) for k, v in params.items()]
        # one value per (key, step): MLflow's logged-model metrics are unique on it
        points = {(k, 0): float(v) for k, v in metrics.items() if _finite(v)}
        for k, pts in histories.items():
            points.update({(k, int(s)): float(v) for s, v in pts if _finite(v)})
        ms = [Metric(k, v, now, s) for (k, s), v in points.items()]
        ts = [RunTag(k, str(v)) for k, v in tags.items()]
        # log_batch accepts at most 100 params, 100 tags and 1000 metrics per call
        for j in range(0, len(flat), 100):
            cl.log_batch(run_id, params=flat[j : j + 100])
        for j in range(0, len(ts), 100):
            cl.log_batch(run_id, tags=ts[j : j + 100])
        for j in range(0, len(ms), 1000):
            cl.log_batch(run_id, metrics=ms[j : j + 1000])
        for art_dir, path in files:
            if Path(path).exists():
                mlflow.log_artifact(str(path), artifact_path=art_dir)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=pyfunc_model.__file__,
            artifacts={pyfunc_model.ARTIFACT_KEY: str(model_dir)},
            signature=pyfunc_model.signature(),
            input_example=input_example,
            pip_requirements=_pip_requirements(),
        )
    return {"run_id": run_id, "model_uri": info.model_uri, "experiment_id": exp_id}


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _pip_requirements() -> list[str]:
    """Pinned requirements for the serving environment (avoids MLflow's slow inference)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("mlflow", "numpy", "scipy", "polars", "pyarrow", "jax", "jaxlib", "pandas"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            pass
    return reqs


def register(tracking_uri: str, model_uri: str, name: str, tags: Mapping[str, str]) -> str:
    """Register ``model_uri`` as a new version of ``name``; returns the version (a string)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    return str(mv.version)


# -- registry queries ------------------------------------------------------------------------
def alias_version(tracking_uri: str, name: str, alias: str):
    """The ModelVersion an alias points to, or None (also when the model does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        return client(tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def run_metrics(tracking_uri: str, run_id: str, prefix: str = "test") -> dict[str, float]:
    """``{"ndcg@10": …}`` from a run's ``<prefix>/…`` metrics (latest values)."""
    data = client(tracking_uri).get_run(run_id).data
    head = prefix + "/"
    return {metric_name(k[len(head):]): v for k, v in data.metrics.items()
            if k.startswith(head) and "/" not in k[len(head):]}


def data_version_id(tags: dict[str, str]) -> str | None:
    """The data version a model was trained on: the DVC version id (``vN``, as listed by
    ``infrec versions``) when the run was versioned, else the processed data's content hash."""
    return tags.get("dvc_data_version") or tags.get("data_version")


def version_summary(tracking_uri: str, name: str, version: str) -> dict[str, Any]:
    """Version, aliases, tags, data version, val/test metrics and run id of one model version."""
    cl = client(tracking_uri)
    mv = cl.get_model_version(name, str(version))
    out: dict[str, Any] = {
        "version": str(mv.version), "run_id": mv.run_id, "aliases": list(mv.aliases or []),
        "tags": dict(mv.tags or {}), "data_version": data_version_id(mv.tags or {}),
        "created": mv.creation_timestamp,
    }
    if mv.run_id:
        try:
            out["val"] = run_metrics(tracking_uri, mv.run_id, "val")
            out["test"] = run_metrics(tracking_uri, mv.run_id, "test")
            out["run_tags"] = dict(cl.get_run(mv.run_id).data.tags)
            out["run_metrics"] = dict(cl.get_run(mv.run_id).data.metrics)
        except Exception:  # noqa: BLE001 - run deleted: the version still exists
            out.setdefault("val", {})
            out.setdefault("test", {})
    return out


def latest_version(tracking_uri: str, name: str) -> Optional[str]:
    from mlflow.exceptions import MlflowException

    try:
        versions = client(tracking_uri).search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return str(max(int(v.version) for v in versions)) if versions else None


def load_version_model(tracking_uri: str, model_uri: str):
    """``(InfAE, item_ids, info)`` of a registered pyfunc (e.g. ``models:/NAME@champion``)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    inner = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    return inner.model, inner.item_ids, inner.info


# -- re-checking the gates of a registered version (``infrec promote``) ---------------------------
def recheck_gate_inputs(tracking_uri: str, name: str, version: str, metric: str = "ndcg@10"):
    """:class:`tasks.gates.GateInputs` of a registered version, from its run and the champion now.

    The champion is compared on the version's own test split: re-evaluated there when the
    version's processed data is still on disk (same data version), else its logged test metric
    (stated in the note).
    """
    from tasks.errors import InputError
    from tasks.gates import GateInputs

    cl = client(tracking_uri)
    try:
        mv = cl.get_model_version(name, str(version))
    except Exception:  # noqa: BLE001 - MlflowException: no such model / version
        raise InputError(f"{name} version {version}: not found in {tracking_uri}") from None
    if not mv.run_id:
        raise InputError(f"{name} version {version}: has no MLflow run "
                         "(not registered by `infrec run`)")
    run = cl.get_run(mv.run_id)
    m = {k: v for k, v in run.data.metrics.items()}
    key = metric.replace("@", "_at_")
    cand_data = (mv.tags or {}).get("data_version")

    champ = alias_version(tracking_uri, name, CHAMPION)
    champ_test = champ_note = champ_version = None
    if champ is not None and str(champ.version) != str(version):
        champ_version = str(champ.version)
        champ_data = (champ.tags or {}).get("data_version")
        data_dir = run.data.tags.get("data_dir")
        dataset = None
        if data_dir and Path(data_dir).is_dir():
            from tasks.data import load_dataset

            try:
                candidate_data = load_dataset(data_dir)
                dataset = candidate_data if candidate_data.data_version == cand_data else None
            except InputError:
                dataset = None
        if dataset is not None:
            from tasks.evaluate import evaluate_model_on

            model, item_ids, _ = load_version_model(tracking_uri, f"models:/{name}/{champ_version}")
            champ_test = evaluate_model_on(model, item_ids, dataset)[metric]
            champ_note = ("same data version" if champ_data == cand_data
                          else f"trained on data {champ_data}, re-evaluated on data {cand_data}")
        elif champ.run_id:
            champ_test = run_metrics(tracking_uri, champ.run_id, "test").get(metric)
            champ_note = ("logged test metric, same data version" if champ_data == cand_data
                          else f"logged test metrics on different data ({champ_data} vs "
                               f"{cand_data}): v{version}'s data is no longer on disk")
    return GateInputs(
        candidate_val=m.get(f"val/{key}"), candidate_test=m.get(f"test/{key}"),
        pop_val=m.get(f"poprec/val/{key}"), ease_val=m.get(f"ease/val/{key}"),
        reference_test=m.get(f"reference/test/{key}"),
        reference=run.data.tags.get("reference.description", "∞-AE on all users"),
        champion_test=champ_test, champion_version=champ_version, champion_note=champ_note or "",
    )


# -- promotion ---------------------------------------------------------------------------------
def apply_verdict(
    tracking_uri: str,
    name: str,
    version: str,
    *,
    passed: bool,
    reasons: list[str],
    run_id: Optional[str] = None,
    forced_by: Optional[str] = None,
    force_reason: Optional[str] = None,
) -> dict[str, Any]:
    """Move aliases for a verdict and record it on the version (and its run).

    Pass (or forced): ``previous`` ← the old champion (set first, so a failure midway leaves the
    champion where it was), then ``champion`` ← ``version``; a ``challenger`` alias on ``version``
    is removed. Fail: ``challenger`` ← ``version``; ``champion`` untouched.
    Returns ``{"promoted", "champion", "previous"}``.
    """
    cl = client(tracking_uri)
    version = str(version)
    promote = passed or forced_by is not None
    text = "\n".join(reasons)  # one gate per line (a reason may contain "; ")
    cl.set_model_version_tag(name, version, "gate.passed", str(passed).lower())
    cl.set_model_version_tag(name, version, "promoted", str(promote).lower())
    cl.set_model_version_tag(name, version, "gate.reasons", text or "-")
    if forced_by is not None:
        cl.set_model_version_tag(name, version, "promotion.forced_by", forced_by)
        cl.set_model_version_tag(name, version, "promotion.reason", force_reason or "-")
    if run_id:
        cl.set_tag(run_id, "gate.passed", str(passed).lower())
        cl.set_tag(run_id, "gate.reasons", text[:7900] or "-")
        cl.log_metric(run_id, "gate/passed", 1.0 if passed else 0.0)
    old = alias_version(tracking_uri, name, CHAMPION)
    old_version = str(old.version) if old is not None else None
    if not promote:
        cl.set_registered_model_alias(name, CHALLENGER, version)
        return {"promoted": False, "champion": old_version, "previous": None}
    if old_version is not None and old_version != version:
        cl.set_registered_model_alias(name, PREVIOUS, old_version)
    cl.set_registered_model_alias(name, CHAMPION, version)
    challenger = alias_version(tracking_uri, name, CHALLENGER)
    if challenger is not None and str(challenger.version) == version:
        cl.delete_registered_model_alias(name, CHALLENGER)
    return {"promoted": True, "champion": version,
            "previous": old_version if old_version != version else None}


__all__ = [
    "metric_key", "metric_name", "file_hash", "git_commit", "configure", "log_run", "register",
    "alias_version", "version_summary", "latest_version", "load_version_model", "apply_verdict",
    "plot_lambda_path", "plot_curve", "curve_histories",
]
