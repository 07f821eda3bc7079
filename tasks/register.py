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

A candidate whose data, summary, params and code equal the champion's is **unchanged**: nothing
is logged or registered and the champion's version is returned. Entry points:
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
from tasks.gates import catalogue_fingerprint, evaluated_users
from tasks.io import content_hash, read_json
from tasks.params import Params
from tasks.runtime import fault_point, say, task_options

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


def unchanged_champion(tracking_uri: str, name: str, tags: dict[str, str]) -> Optional[str]:
    """The champion's version when the candidate equals it (same data, summary, params, clean
    code), else None."""
    if tags["git_commit"].endswith("+dirty") or tags["git_commit"] == "unknown":
        return None
    champ = registry.alias_version(tracking_uri, name, registry.CHAMPION)
    if champ is None:
        return None
    ct = champ.tags or {}
    keys = ("data_hash", "summary_hash", "params_hash", "git_commit")
    return str(champ.version) if all(ct.get(k) == tags[k] for k in keys) else None


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
    metrics["distill/best_step"] = distill_report["best_step"]
    metrics["distill/budget"] = distill_report["budget"]
    metrics.update({f"seconds/{stage}": s for stage, s in seconds.items()})
    return metrics


def run(params: Params, lineage: Optional[dict[str, Any]] = None,
        log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """The register stage (see the module docstring). Returns ``{"model_name", "version",
    "run_id", "unchanged", "tags"}``."""
    import mlflow
    import pandas as pd

    from tasks import serving

    log = log or say()
    lineage = lineage or {}
    paths, uri, name = params.paths(), params.tracking_uri(), params.registry.model_name
    evaluation = read_json(paths.evaluation, "the evaluate stage's report")
    distill_report = read_json(paths.distill_report, "the distill stage's report")
    tags = identity(params, lineage)
    same = unchanged_champion(uri, name, tags)
    if same is not None:
        log(f"unchanged: data, summary, params and code equal the champion's (v{same}); "
            "nothing registered")
        return {"model_name": name, "version": same, "run_id": None, "unchanged": True,
                "tags": tags}

    metric = params.selection.metric
    cand = evaluation["candidate"]
    data_label = tags.get("data_version") or tags["data_hash"]
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    description = (f"Candidate ∞-AE on a {distill_report['sampler']} summary of "
                   f"{distill_report['budget']} users, data {data_label}: test {metric} "
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
    files = [("reports", p) for p in (paths.metrics, paths.evaluation, paths.distill_report,
                                      paths.lambda_path, paths.distill_curve)]
    files += [("plots", p) for p in sorted(paths.plots.glob("*.png"))]
    files.append(("distill", paths.distill_log))

    dataset = load_dataset(paths.processed)
    first = dataset.train[0].indices[:5]
    example = pd.DataFrame({"history": [[int(x) for x in dataset.item_ids[first]]], "k": [10]})

    def log_model():
        return mlflow.pyfunc.log_model(
            name="model", python_model=serving.__file__,
            artifacts={serving.ARTIFACT_KEY: str(paths.model)},
            code_paths=[str(PROJECT / "models"), str(PROJECT / "tasks")],
            signature=serving.signature(), input_example=example,
            pip_requirements=serving_requirements(),
            model_config=params.serving.model_dump(),
        )

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


def serving_requirements() -> list[str]:
    """Pinned requirements of the served model: only what :mod:`tasks.serving` imports."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("mlflow", "numpy", "scipy", "polars", "pyarrow", "pandas", "jax", "jaxlib",
                "pydantic", "pyyaml"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            pass
    return reqs


@task(name="register", **task_options())
def register_task(params: Params, lineage: dict[str, Any]) -> dict[str, Any]:
    return run(params, lineage)


__all__ = ["run", "register_task", "identity", "model_params_hash", "unchanged_champion",
           "LINEAGE_TAGS"]
