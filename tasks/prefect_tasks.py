"""Prefect tasks: thin wrappers over the plain functions of ``tasks/`` for the flows in ``flows/``.

Tasks pass file paths and small dicts (never large arrays), log through Prefect's run logger,
and — when they touch files or services (data files, MLflow) — retry with backoff on transient
errors. Deterministic errors (bad input, bad numbers) are not retried: retrying them only delays
the one-line error the user gets.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from tasks.errors import InputError

REPORT_KEY = "infrec-pipeline-report"  # Prefect artifact keys: lowercase letters, digits, dashes
_NOT_TRANSIENT = (InputError, ValueError, TypeError, KeyError, MemoryError, np.linalg.LinAlgError)
_TRANSIENT_MLFLOW_CODES = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED",
                           "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "ABORTED")


def _retry_transient(_task, _task_run, state) -> bool:
    """Retry unless the failure is deterministic (see ``_NOT_TRANSIENT``)."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001 - unreadable result: treat as transient
            return True
    if isinstance(exc, _NOT_TRANSIENT):
        return False
    code = getattr(exc, "error_code", None)  # MlflowException: only server-side trouble is retried
    return code is None or code in _TRANSIENT_MLFLOW_CODES


# Every task: no cross-run caching, no result persistence (results are small and re-computed).
_BASE = dict(cache_policy=NO_CACHE, persist_result=False)
# Tasks touching files or services: 2 retries with backoff (1 s, then 5 s).
_IO = dict(_BASE, retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=_retry_transient)


def _log():
    return get_run_logger().info


# -- ingest ------------------------------------------------------------------------------------
@task(name="generate-default-data", **_IO)
def generate_default_data(out_path: str, users: int, items: int, seed: int) -> str:
    """The embedded default input: deterministic synthetic data (same params → same bytes)."""
    from tasks.synthetic import write_synthetic

    stats = write_synthetic(out_path, n_users=users, n_items=items, seed=seed)
    _log()(f"generated {stats['rows']} interactions "
           f"({stats['users']} users × {stats['items']} items, seed {seed}) → {out_path}")
    return str(out_path)


@task(name="ingest-data", **_IO)
def ingest_data(input_path: str, out_dir: str, seed: int,
                min_rating: Optional[float]) -> dict[str, Any]:
    from tasks.data import load_dataset
    from tasks.ingest import ingest

    t0 = time.perf_counter()
    manifest = ingest(input_path, out_dir, seed=seed, min_rating=min_rating, overwrite=True)
    data_version = load_dataset(out_dir).data_version
    _log()(f"ingested {input_path} → {out_dir}: {manifest.get('counts')} "
           f"(data version {data_version}, {time.perf_counter() - t0:.1f}s)")
    return {"data_dir": str(out_dir), "data_version": data_version,
            "counts": manifest.get("counts", {}), "input": str(input_path)}


# -- distill -----------------------------------------------------------------------------------
@task(name="distill-summary", **_IO)
def distill_summary(data_dir: str, out_path: str, log_path: str,
                    distill: dict[str, Any]) -> dict[str, Any]:
    """Write the data summary the candidate is fitted on (Distill-CF or a sampler baseline)."""
    from tasks.distill import distill_dataset
    from tasks.registry import file_hash

    config = dict(distill)
    options = config.pop("options", {}) or {}
    log = _log()

    def on_step(step: dict[str, Any]) -> None:  # evaluated steps only: the log stays short
        if step.get("evaluated"):
            val = step.get("val") or {}
            nan = float("nan")
            log(f"step {step['step']}: loss {step.get('loss')}, val hr@100 "
                f"{val.get('hr@100', nan):.2f}, ndcg@10 {val.get('ndcg@10', nan):.2f}")

    t0 = time.perf_counter()
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    info = distill_dataset(data_dir, out_path, log_path=log_path, progress=False, on_step=on_step,
                           **config, **options)
    seconds = time.perf_counter() - t0
    summary_hash = file_hash(out_path)
    _log()(f"summary ({config.get('sampler')}, budget {config.get('budget')}) → {out_path} "
           f"hash {summary_hash} in {seconds:.1f}s")
    return {"summary_path": str(out_path), "summary_hash": summary_hash, "log_path": str(log_path),
            "seconds": seconds, "info": _jsonable(info)}


def read_curve(log_path: str) -> list[dict[str, Any]]:
    """The JSON-lines step log of a distillation (empty when there is none)."""
    path = Path(log_path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


# -- fit ---------------------------------------------------------------------------------------
@task(name="fit-candidate", **_IO)
def fit_candidate(data_dir: str, summary_path: str, out_dir: str,
                  fit: dict[str, Any]) -> dict[str, Any]:
    """∞-AE on the summary (λ from ``fit.summary_lambdas`` on validation HR@100), saved."""
    from tasks.data import load_dataset
    from tasks.fit import fit_dataset, save_model

    dataset = load_dataset(data_dir)
    model, report = fit_dataset(
        dataset, lambdas=fit["summary_lambdas"], depth=fit["depth"], support_path=summary_path,
        batch_size=fit["batch_size"], log=_log(),
    )
    save_model(model, out_dir, dataset.item_ids, report, dataset.data_version, overwrite=True)
    return {"model_dir": str(out_dir), "lambda": model.lam, "val": report["metrics"]["val"],
            "test": report["metrics"]["test"], "lambda_path": report["lambda_path"],
            "support": _jsonable({k: v for k, v in report["support"].items() if k != "meta"}),
            "seconds": report["seconds"]}


# -- evaluate ----------------------------------------------------------------------------------
@task(name="evaluate-baselines", **_IO)
def evaluate_baselines(data_dir: str, ease_lambdas: Optional[list[float]]) -> dict[str, Any]:
    from tasks.data import load_dataset
    from tasks.evaluate import baseline_metrics

    return baseline_metrics(load_dataset(data_dir), ease_lambdas=ease_lambdas, log=_log())


@task(name="fit-reference", **_IO)
def fit_reference(data_dir: str, max_users: int, seed: int, fit: dict[str, Any]) -> dict[str, Any]:
    """Gate (c)'s reference: ∞-AE on all users (or the largest allowed sample)."""
    from tasks.data import load_dataset
    from tasks.evaluate import reference_metrics

    ref = reference_metrics(load_dataset(data_dir), max_users=max_users, seed=seed,
                            lambdas=fit["lambdas"], depth=fit["depth"],
                            batch_size=fit["batch_size"], log=_log())
    _log()(f"reference: {ref['description']}, λ={ref['lambda']:g}, "
           f"test ndcg@10={ref['test']['ndcg@10']:.2f}")
    return _jsonable(ref)


@task(name="evaluate-champion", **_IO)
def evaluate_champion(data_dir: str, tracking_uri: str,
                      model_name: str) -> Optional[dict[str, Any]]:
    """The current champion re-evaluated on this data's test split (None: no champion yet)."""
    from tasks import registry
    from tasks.data import load_dataset
    from tasks.evaluate import evaluate_model_on

    mv = registry.alias_version(tracking_uri, model_name, registry.CHAMPION)
    if mv is None:
        _log()(f"no champion for {model_name} yet")
        return None
    dataset = load_dataset(data_dir)
    model, item_ids, _info = registry.load_version_model(
        tracking_uri, f"models:/{model_name}/{mv.version}"
    )
    test = evaluate_model_on(model, item_ids, dataset)
    champ_data = (mv.tags or {}).get("data_version")
    note = ("same data version" if champ_data == dataset.data_version
            else f"trained on data {champ_data}, re-evaluated on this data's test split")
    _log()(f"champion v{mv.version}: test ndcg@10={test['ndcg@10']:.2f} ({note})")
    return {"version": str(mv.version), "data_version": champ_data, "test": test, "note": note}


# -- register ----------------------------------------------------------------------------------
@task(name="log-run", **_IO)
def log_run(
    *,
    tracking_uri: str,
    experiment: str,
    artifact_root: str,
    run_dir: str,
    params: dict[str, Any],
    data: dict[str, Any],
    summary: dict[str, Any],
    fitted: dict[str, Any],
    evaluation: dict[str, Any],
    flow_run_id: str,
) -> dict[str, Any]:
    """Log the pipeline run to MLflow (params, metrics, curves, plots, tags, pyfunc model)."""
    import pandas as pd

    from tasks import registry
    from tasks.registry import flatten, metric_key

    run_path = Path(run_dir)
    plots = run_path / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    curve = read_curve(summary["log_path"])
    registry.plot_curve(curve, plots / "distill_curve.png",
                        title=f"Distill-CF ({params['distill']['sampler']})")
    registry.plot_lambda_path(fitted["lambda_path"], plots / "lambda_path.png")
    (run_path / "lambda_path.json").write_text(json.dumps(fitted["lambda_path"], indent=2))
    (run_path / "evaluation.json").write_text(json.dumps(_jsonable(evaluation), indent=2))

    metrics: dict[str, float] = {"lambda": fitted["lambda"]}
    for split in ("val", "test"):
        metrics.update({metric_key(split, k): v for k, v in fitted[split].items()})
    base = evaluation["baselines"]
    for name in ("poprec", "ease"):
        for split in ("val", "test"):
            metrics.update({metric_key(name, split, k): v for k, v in base[name][split].items()})
    ref = evaluation["reference"]
    for split in ("val", "test"):
        metrics.update({metric_key("reference", split, k): v for k, v in ref[split].items()})
    champ = evaluation.get("champion")
    if champ:
        metrics.update({metric_key("champion", "test", k): v for k, v in champ["test"].items()})
    metrics["timing/distill_seconds"] = summary["seconds"]

    histories = registry.curve_histories(curve)
    ordered = sorted(fitted["lambda_path"], key=lambda r: r["lambda"])
    for m in ("ndcg@10", "hr@100"):
        histories[metric_key("lambda_path", "val", m)] = [
            (i, r[m]) for i, r in enumerate(ordered) if m in r
        ]

    stages = ("distill", "fit", "evaluate", "gates", "ingest")
    run_params = flatten("", {k: params[k] for k in stages})
    run_params.update({
        "data.input": data["input"], "data.users": data["counts"].get("users"),
        "data.items": data["counts"].get("items"), "ease.lambda": base["ease"]["lambda"],
        "reference.lambda": ref["lambda"],
        "lambda_path.lambdas": json.dumps([r["lambda"] for r in ordered]),
    })
    tags = lineage_tags(params, data, summary, flow_run_id)
    tags.update({"reference.description": ref["description"], "data_dir": data["data_dir"],
                 "summary_path": summary["summary_path"]})

    from tasks.data import load_dataset

    dataset = load_dataset(data["data_dir"])
    first = dataset.train[0].indices[:5]
    example = pd.DataFrame({"history": [[int(x) for x in dataset.item_ids[first]]], "k": [10]})
    out = registry.log_run(
        tracking_uri=tracking_uri, experiment=experiment, artifact_root=artifact_root,
        run_name=f"pipeline-{data['data_version']}", params=run_params, metrics=metrics,
        histories=histories, tags=tags,
        files=[("plots", plots / "distill_curve.png"), ("plots", plots / "lambda_path.png"),
               ("metrics", run_path / "evaluation.json"),
               ("metrics", run_path / "lambda_path.json"),
               ("distill", summary["log_path"])],
        model_dir=fitted["model_dir"], input_example=example,
    )
    _log()(f"MLflow run {out['run_id']} logged "
           f"({len(metrics)} metrics, {len(histories)} histories)")
    return out


def lineage_tags(params: dict[str, Any], data: dict[str, Any], summary: dict[str, Any],
                 flow_run_id: str) -> dict[str, str]:
    from tasks.registry import git_commit, params_hash

    tags = {
        "data_version": data["data_version"],
        "summary_hash": summary["summary_hash"],
        "git_commit": git_commit(),
        "prefect_flow_run_id": flow_run_id,
        "params_hash": params_hash(params),
    }
    if data.get("dvc_data_version"):  # DVC data version (infrec versions / rollback)
        tags["dvc_data_version"] = data["dvc_data_version"]
        tags["dvc_hashes"] = json.dumps(data["dvc_hashes"], sort_keys=True)
    return tags


@task(name="register-version", **_IO)
def register_version(tracking_uri: str, model_uri: str, model_name: str,
                     tags: dict[str, str]) -> str:
    from tasks import registry

    version = registry.register(tracking_uri, model_uri, model_name, tags)
    _log()(f"registered {model_name} version {version}")
    return version


# -- gates and promotion -------------------------------------------------------------------------
@task(name="decide-gates", **_BASE)
def decide_gates(evaluation: dict[str, Any], fitted: dict[str, Any],
                 gates: dict[str, Any]) -> dict[str, Any]:
    """Pure: the gate verdict from the numbers of this run."""
    from tasks.gates import GateInputs, GateThresholds
    from tasks.gates import decide_gates as decide

    thresholds = GateThresholds.from_params(gates)
    m = thresholds.metric
    base, ref, champ = evaluation["baselines"], evaluation["reference"], evaluation.get("champion")
    inputs = GateInputs(
        candidate_val=fitted["val"][m], candidate_test=fitted["test"][m],
        pop_val=base["poprec"]["val"][m], ease_val=base["ease"]["val"][m],
        reference_test=ref["test"][m], reference=ref["description"],
        champion_test=champ["test"][m] if champ else None,
        champion_version=champ["version"] if champ else None,
        champion_note=champ["note"] if champ else "",
    )
    verdict = decide(inputs, thresholds)
    for line in verdict.reasons:
        _log()(line)
    return verdict.to_dict()


@task(name="apply-verdict", **_IO)
def apply_verdict(tracking_uri: str, model_name: str, version: str, verdict: dict[str, Any],
                  run_id: Optional[str]) -> dict[str, Any]:
    from tasks import registry

    moved = registry.apply_verdict(tracking_uri, model_name, version, passed=verdict["passed"],
                                   reasons=verdict["reasons"], run_id=run_id)
    if moved["promoted"]:
        extra = f" ({registry.PREVIOUS} → v{moved['previous']})" if moved["previous"] else ""
        _log()(f"{registry.CHAMPION} → v{version}{extra}")
    else:
        _log()(f"v{version} → {registry.CHALLENGER}; champion stays "
               f"{'v' + moved['champion'] if moved['champion'] else 'unset'}")
    return moved


@task(name="publish-report", **_BASE)
def publish_report(result: dict[str, Any]) -> str:
    """A Prefect markdown artifact: val/test metrics and gate results, MLflow run and version."""
    from prefect.artifacts import create_markdown_artifact

    markdown = report_markdown(result)
    artifact_id = create_markdown_artifact(
        key=REPORT_KEY, markdown=markdown,
        description=f"infrec pipeline: {result['model_name']} v{result['version']}",
    )
    _log()(f"report published as Prefect artifact '{REPORT_KEY}' ({artifact_id})")
    return markdown


def report_markdown(result: dict[str, Any]) -> str:
    from models.metrics import METRIC_KEYS

    ev = result["evaluation"]
    rows = [("candidate (summary)", result["fitted"]),
            ("PopRec", ev["baselines"]["poprec"]), ("EASE", ev["baselines"]["ease"]),
            (ev["reference"]["description"], ev["reference"])]
    champ = ev.get("champion")
    lines = [
        f"# infrec pipeline — {result['model_name']} v{result['version']}",
        "",
        f"MLflow run `{result['run_id']}` · data version `{result['data_version']}` · "
        f"summary `{result['summary_hash']}` · "
        f"verdict **{'PROMOTED' if result['promoted'] else 'REJECTED'}**",
        "",
        "| model | split | " + " | ".join(METRIC_KEYS) + " |",
        "|---|---|" + "---|" * len(METRIC_KEYS),
    ]
    for name, block in rows:
        for split in ("val", "test"):
            vals = block.get(split) or {}
            cells = " | ".join(_fmt(vals.get(k)) for k in METRIC_KEYS)
            lines.append(f"| {name} | {split} | {cells} |")
    if champ:
        lines.append(f"| champion v{champ['version']} | test | "
                     + " | ".join(_fmt(champ["test"].get(k)) for k in METRIC_KEYS) + " |")
    lines += ["", "| gate | result | reason |", "|---|---|---|"]
    for g in result["verdict"]["gates"]:
        lines.append(f"| {g['name']} | {'pass' if g['passed'] else 'FAIL'} | {g['reason']} |")
    lines += ["", f"Champion: {'v' + result['champion'] if result.get('champion') else 'none'}"]
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    return "–" if v is None else (f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}")


def _jsonable(obj: Any) -> Any:
    """Numpy scalars/arrays → Python values (for Prefect parameters and JSON files)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj


# -- data versions (DVC) ----------------------------------------------------------------------
@task(name="record-data-version", **_IO)
def record_data_version(workspace: str, state_dir: str, info: dict[str, Any]) -> dict[str, Any]:
    """``dvc commit`` + ``dvc push`` the ingest/distill outputs and record a data version."""
    import os

    from tasks.versioning import version_stage_outputs

    root = Path(workspace).resolve()
    rel = os.path.relpath(Path(state_dir).resolve(), root)
    paths = [f"{rel}/data/processed", f"{rel}/data/summary.parquet"]
    t0 = time.perf_counter()
    result = version_stage_outputs(root, ["generate", "ingest", "distill"] if info.get("generated")
                                   else ["ingest", "distill"], paths, Path(state_dir) / "dvc-remote",
                                   info)
    note = "new" if result["created"] else "unchanged data: same"
    _log()(f"{note} data version {result['version']} ({time.perf_counter() - t0:.1f}s): "
           f"{result['hashes']}")
    return result
