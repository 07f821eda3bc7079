"""Register stage: log the candidate to MLflow and register it as a new model version.

``run(params, lineage)`` reads the stage outputs (``<state_dir>/model`` and the ``reports/``
files) and

* logs one MLflow run — named ``<data version>-<UTC time>``, its description the candidate's
  figures — with every parameter, the metrics of the candidate, PopRec, EASE, the full-data
  reference and the random-users baseline (``val/ndcg_at_10``, ``ease/test/hr_at_100``…), the
  Distill-CF curve and metric versus λ as metric histories, the reports and plots as
  artifacts, the lineage tags, and the model as a self-contained pyfunc (:mod:`tasks.serving`,
  with the project's ``models/`` and ``tasks/`` as its code);
* registers it under ``registry.model_name`` with the lineage as version tags.

A candidate whose data, summary, params and code equal those of any registered version (champion
or not, never an ``incomplete`` one) is **unchanged**: nothing is logged or registered and that
version is returned. :func:`unchanged_before_ingest` decides the same before any stage runs (the
input's content, the data and summary on disk, the params and the code), so a run over unchanged
data ends in seconds. Entry points:
:func:`register_task` and ``infrec register --params params.yaml`` (after ``dvc repro``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

from prefect import task

from tasks import registry
from tasks.data import load_dataset
from tasks.errors import InputError
from tasks.gates import catalogue_fingerprint, evaluated_users
from tasks.io import content_hash, read_json, sha256_file
from tasks.params import Params
from tasks.runtime import fault_point, say, task_options
from tasks.version import processed_data_hash

# the sections whose values decide the candidate and its verdict (tracking, schedule, serving and
# versioning do not)
MODEL_SECTIONS = ("generate", "ingest", "selection", "fit", "distill", "evaluate", "gates")
LINEAGE_TAGS = ("data_version", "data_hash", "catalogue", "summary_hash", "input_sha256",
                "input_source", "params_hash", "git_commit", "prefect_flow_run_id", "dvc_hashes")
PROJECT = Path(__file__).resolve().parents[1]


def model_params_hash(params: Params) -> str:
    """Hash of what decides the candidate and its verdict: :data:`MODEL_SECTIONS`
    (``ingest.input`` is left out: the input's content is in the data hash)."""
    data = params.to_dict()
    chosen = {k: data[k] for k in MODEL_SECTIONS}
    chosen["ingest"] = {k: v for k, v in chosen["ingest"].items() if k != "input"}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:12]


def identity(params: Params, lineage: dict[str, Any]) -> dict[str, str]:
    """The lineage tags of a candidate built from the current stage outputs."""
    paths = params.paths()
    dataset = load_dataset(paths.processed)
    manifest_input = dataset.manifest.get("input", {})
    tags = {
        "data_hash": dataset.data_version,
        "summary_hash": content_hash(paths.summary),
        "params_hash": model_params_hash(params),
        "git_commit": lineage.get("git_commit") or registry.git_commit(),
        "input_sha256": manifest_input.get("sha256", ""),
        "input_source": (lineage.get("input") or {}).get("source", manifest_input.get("name", "")),
        "eval_users": str(evaluated_users(dataset)),  # the evidence gate's figure
        "catalogue": catalogue_fingerprint(dataset.item_ids),  # which items it knows
    }
    versioned = lineage.get("version")
    if versioned:
        tags["data_version"] = versioned["version"]
        tags["dvc_hashes"] = json.dumps(versioned["hashes"], sort_keys=True)
    if lineage.get("flow_run_id"):
        tags["prefect_flow_run_id"] = str(lineage["flow_run_id"])
    return tags


_SAME = ("data_hash", "summary_hash", "params_hash", "git_commit")


def equal_version(tracking_uri: str, name: str, tags: dict[str, str],
                  champion_only: bool = False) -> Optional[Any]:
    """The newest decided version (the champion only, with ``champion_only``) whose data,
    summary, params and clean code equal ``tags``'s: its verdict recorded and its aliases moved
    (never one whose run was interrupted). None when the code is uncommitted or none equals it."""
    if tags["git_commit"].endswith("+dirty") or tags["git_commit"] == "unknown":
        return None
    if champion_only:
        champ = registry.alias_version(tracking_uri, name, registry.CHAMPION)
        candidates = [champ] if champ is not None else []
    else:
        candidates = registry.model_versions(tracking_uri, name)[::-1]
    for mv in candidates:
        t = mv.tags or {}
        if t.get(registry.STATE_TAG) == registry.DECIDED and all(t.get(k) == tags[k]
                                                                 for k in _SAME):
            return mv
    return None


def unchanged_champion(tracking_uri: str, name: str, tags: dict[str, str]) -> Optional[str]:
    """The champion's version when the candidate equals it, else None."""
    mv = equal_version(tracking_uri, name, tags, champion_only=True)
    return None if mv is None else str(mv.version)


def _describe(mv: Any) -> str:
    t = mv.tags or {}
    verdict = {"true": "passed its gates", "false": "rejected"}.get(t.get("gate.passed") or "",
                                                                   "no verdict")
    return f"v{mv.version}, {verdict}" + (", champion" if "champion" in (mv.aliases or []) else "")


def _lock_agrees(params: Params) -> bool:
    """With versioning on: dvc.lock already records this run's params (a run that would change
    them — another ``--input`` path, ``--params other.yaml`` — runs its stages and rewrites it,
    so ``dvc status`` stays true)."""
    if not params.versioning.enabled:
        return True
    from tasks.dvc import set_lock_params
    from tasks.version import check, lock_params

    try:
        root = check(params)
        text = (root / "dvc.lock").read_text()
    except (InputError, OSError):
        return False
    return set_lock_params(text, lock_params(params, root)) == text


def unchanged_before_ingest(params: Params, lineage: dict[str, Any],
                            log: Optional[Callable[[str], None]] = None
                            ) -> Optional[dict[str, Any]]:
    """Before any stage: when the input file's content is what the data on disk was made from,
    and that data, the summary on disk, the params and the (clean) code equal a registered
    version's, the run is **unchanged** — the pipeline's result (from that run's reports on disk)
    with nothing run or registered. None otherwise (the stages run)."""
    log = log or say()
    paths, uri, name = params.paths(), params.tracking_uri(), params.registry.model_name
    commit = lineage.get("git_commit") or registry.git_commit()
    source = params.input_path()
    needed = (source, paths.summary, paths.evaluation, paths.distill_report,
              paths.processed / "manifest.json")
    if commit.endswith("+dirty") or commit == "unknown" or not all(p.is_file() for p in needed):
        return None
    try:
        manifest = json.loads((paths.processed / "manifest.json").read_text())
        evaluation = read_json(paths.evaluation, "the evaluate stage's report")
        distill_report = read_json(paths.distill_report, "the distill stage's report")
    except (OSError, ValueError, InputError):
        return None
    data_hash = processed_data_hash(paths.processed)
    input_sha = sha256_file(source)
    if (manifest.get("input") or {}).get("sha256") != input_sha or not _lock_agrees(params):
        return None
    tags = {"data_hash": data_hash, "summary_hash": content_hash(paths.summary),
            "params_hash": model_params_hash(params), "git_commit": commit}
    mv = equal_version(uri, name, tags)
    if mv is None or (params.versioning.enabled and not (mv.tags or {}).get("data_version")):
        return None
    mv_tags = mv.tags or {}
    champ = registry.alias_version(uri, name, registry.CHAMPION)
    log(f"unchanged: the input's content, data, summary, params and code equal {name} "
        f"{_describe(mv)}; no stage run, nothing registered")
    return {"model_name": name, "version": str(mv.version), "run_id": None,
            "data_version": mv_tags.get("data_version") or data_hash,
            "summary_hash": tags["summary_hash"], "metric": params.selection.metric,
            "candidate": {k: evaluation["candidate"][k] for k in ("lambda", "val", "test")},
            "evaluation": evaluation, "distill": distill_report,
            "input": {"source": str(source), "name": source.name, "sha256": input_sha,
                      "size": source.stat().st_size},
            "unchanged": True, "equals": _describe(mv), "promoted": False, "verdict": None,
            "champion": str(champ.version) if champ is not None else None, "previous": None}


def _curve_histories(curve_csv: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    if not curve_csv.is_file():
        return out
    with curve_csv.open() as fh:
        for row in csv.DictReader(fh):
            for k, v in row.items():
                if k != "step" and v not in ("", None):
                    out.setdefault(registry.metric_key("distill", k), []).append(
                        (int(row["step"]), float(v)))
    return out


def run_metrics(evaluation: dict[str, Any], distill_report: dict[str, Any],
                seconds: dict[str, float]) -> dict[str, float]:
    """The run's flat metrics: ``val/…``/``test/…`` of the candidate, ``<model>/<split>/…`` of
    the baselines, the summary ratios, the distillation and the stage timings."""
    key = registry.metric_key
    metrics: dict[str, float] = {"lambda": evaluation["candidate"]["lambda"]}
    for split in ("val", "test"):
        metrics.update({key(split, k): v for k, v in evaluation["candidate"][split].items()})
    for block in ("poprec", "ease", "reference", "random_users"):
        for split in ("val", "test"):
            values = (evaluation.get(block) or {}).get(split) or {}
            metrics.update({key(block, split, k): v for k, v in values.items()})
    for k, v in evaluation["summary"].items():
        if isinstance(v, (int, float)):
            metrics[key("evaluation", k)] = v
    cand = evaluation["candidate"]
    kernel = cand.get("kernel") or {}
    metrics.update({f"kernel/{k}": float(v) for k, v in kernel.items()})
    for row in cand.get("kernel_search") or []:  # the NTK search on the summary, one per kernel
        if row.get("val"):
            name = f"depth{row['depth']}_w{row['w_var']:g}_b{row['b_var']:g}"
            metrics.update({key("kernel_search", name, k): v for k, v in row["val"].items()})
            metrics[key("kernel_search", name, "lambda")] = row["lambda"]
    for family, block in (cand.get("families") or {}).items():
        for split in ("val", "test"):
            metrics.update({key("family", family, split, k): v
                            for k, v in (block.get(split) or {}).items()})
        if "seconds" in block:  # in memory only: the reports DVC tracks carry no timings
            metrics[key("family", family, "seconds")] = block["seconds"]
    if "weight" in cand:
        metrics["blend/weight"] = cand["weight"]
    metrics["distill/best_step"] = distill_report["best_step"]
    metrics["distill/budget"] = distill_report["budget"]
    metrics.update({f"seconds/{stage}": s for stage, s in seconds.items()})
    return metrics


def run(params: Params, lineage: Optional[dict[str, Any]] = None,
        log: Optional[Callable[[str], None]] = None, champion_only: bool = False
        ) -> dict[str, Any]:
    """The register stage (see the module docstring). Returns ``{"model_name", "version",
    "run_id", "unchanged", "tags"}`` (``equals`` too when unchanged). ``champion_only``: only
    the champion counts as an equal version (a rollback's refit)."""
    import mlflow
    import pandas as pd

    log = log or say()
    lineage = lineage or {}
    paths, uri, name = params.paths(), params.tracking_uri(), params.registry.model_name
    evaluation = read_json(paths.evaluation, "the evaluate stage's report")
    distill_report = read_json(paths.distill_report, "the distill stage's report")
    tags = identity(params, lineage)
    same = equal_version(uri, name, tags, champion_only=champion_only)
    if same is not None:
        log(f"unchanged: data, summary, params and code equal {name} {_describe(same)}; "
            "nothing registered")
        return {"model_name": name, "version": str(same.version), "run_id": None,
                "unchanged": True, "equals": _describe(same), "tags": tags}

    metric = params.selection.metric
    cand = evaluation["candidate"]
    data_label = tags.get("data_version") or tags["data_hash"]
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    if cand.get("family"):
        fitted_on = ("all training users" if cand.get("fit_on") == "full" else
                     f"a {distill_report['sampler']} summary of {distill_report['budget']} users")
        what = f"Candidate {cand['family']} (∞-AE on {fitted_on}; NTK chosen on the summary)"
    else:
        what = (f"Candidate ∞-AE on a {distill_report['sampler']} summary of "
                f"{distill_report['budget']} users")
    description = (f"{what}, data {data_label}: test {metric} "
                   f"{cand['test'][metric]:.2f}, fidelity {evaluation['summary']['fidelity']:.3f}"
                   f" (verdict pending)")
    histories = _curve_histories(paths.distill_curve)
    path = read_json(paths.lambda_path, "the fit stage's λ path")
    for m in dict.fromkeys([metric, "hr@100"]):
        histories[registry.metric_key("lambda_path", "val", m)] = [
            (i, r[m]) for i, r in enumerate(sorted(path, key=lambda r: r["lambda"])) if m in r]
    run_params = registry.flatten("", {k: v for k, v in params.to_dict().items()
                                       if k not in ("tracking",)})
    run_params["lambda_path.lambdas"] = str([r["lambda"] for r in path])
    run_params.update(selection_params(cand))
    files = [("reports", p) for p in (paths.metrics, paths.evaluation, paths.distill_report,
                                      paths.lambda_path, paths.distill_curve)]
    files += [("plots", p) for p in sorted(paths.plots.glob("*.png"))]
    files.append(("distill", paths.distill_log))

    dataset = load_dataset(paths.processed)
    first = dataset.train[0].indices[:5]
    example = pd.DataFrame({"history": [[int(x) for x in dataset.item_ids[first]]], "k": [10]})

    def log_model():
        return log_pyfunc(paths.model, params.serving.model_dump(), example)

    logged = registry.log_run(
        tracking_uri=uri, experiment=params.registry.experiment,
        artifact_root=params.state_path() / "mlartifacts", run_name=f"{data_label}-{stamp}",
        description=description, params=run_params,
        metrics=run_metrics(evaluation, distill_report, lineage.get("seconds", {})),
        histories=histories, tags=tags, files=files, log_model=log_model,
    )
    version = registry.register(uri, logged["model_uri"], name,
                                {**tags, "mlflow_run_id": logged["run_id"]})
    fault_point("registration")  # registered, no verdict yet
    log(f"registered {name} version {version} (MLflow run {logged['run_id']}, data {data_label})")
    return {"model_name": name, "version": version, "run_id": logged["run_id"],
            "unchanged": False, "tags": tags}


def selection_params(candidate: dict[str, Any]) -> dict[str, str]:
    """What the fit stage chose, as run params: the family and why, what ∞-AE was fitted on,
    the NTK and λ chosen (on the summary, by validation), the blend's weight."""
    if not candidate.get("family"):
        return {}
    kernel = candidate.get("kernel") or {}
    out = {"candidate.family": candidate["family"],
           "candidate.selected_because": candidate.get("selected_because", "")[:500],
           "candidate.fit_on": str(candidate.get("fit_on")),
           "candidate.kernel": ", ".join(f"{k}={v:g}" for k, v in kernel.items()),
           "candidate.lambda": f"{candidate['lambda']:g}"}
    if "weight" in candidate:
        out["candidate.blend_weight"] = f"{candidate['weight']:g}"
    return out


def log_pyfunc(model_dir: Any, limits: dict[str, int], example: Any) -> Any:
    """Log the model directory ``model_dir`` as the served pyfunc (:mod:`tasks.serving`, with this
    checkout's ``models/`` and ``tasks/`` as its code) into the active MLflow run; returns the
    ``ModelInfo``. ``limits``: ``serving.*``; ``example``: a request DataFrame."""
    import mlflow

    from tasks import serving

    return mlflow.pyfunc.log_model(
        name="model", python_model=serving.__file__,
        artifacts={serving.ARTIFACT_KEY: str(model_dir)},
        code_paths=[str(PROJECT / "models"), str(PROJECT / "tasks")],
        signature=serving.signature(), input_example=example,
        pip_requirements=serving_requirements(),
        model_config=dict(limits),
    )


def serving_requirements() -> list[str]:
    """Pinned requirements of the served model: only what :mod:`tasks.serving` imports."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("mlflow", "numpy", "scipy", "polars", "pyarrow", "pandas", "jax", "jaxlib",
                "pydantic", "pyyaml", "threadpoolctl"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            pass
    return reqs


@task(name="register", **task_options())
def register_task(params: Params, lineage: dict[str, Any]) -> dict[str, Any]:
    return run(params, lineage)


@task(name="unchanged-check", **task_options())
def unchanged_task(params: Params, lineage: dict[str, Any]) -> Optional[dict[str, Any]]:
    return unchanged_before_ingest(params, lineage)


__all__ = ["run", "register_task", "identity", "model_params_hash", "unchanged_champion",
           "equal_version", "unchanged_before_ingest", "unchanged_task", "LINEAGE_TAGS"]
