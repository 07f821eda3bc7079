"""The end-to-end pipeline: ingest → distill → fit → evaluate → register → gate/promote.

Each stage is a subflow (``flows/<stage>.py``); this module only wires them. ``params`` is parsed
once at the entry point (``infrec run``) and resolved (absolute state dir, tracking URI).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from prefect import flow
from prefect.runtime import flow_run

from flows.distill import distill_flow
from flows.evaluate import evaluate_flow
from flows.fit import fit_flow
from flows.ingest import ingest_flow
from flows.promote import promote_flow
from flows.version import version_flow
from flows.register import register_flow
from infrec.config import Params
from tasks.concurrency import registry_slot
from tasks.prefect_tasks import publish_report


@flow(name="infrec-pipeline")
def pipeline(params: Params, input_path: Optional[str] = None) -> dict[str, Any]:
    run_id = str(flow_run.id or "local")
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{run_id[:8]}"
    run_dir = str(Path(params.state_dir) / "runs" / stamp)

    # one pipeline at a time per state dir: every stage writes shared paths (processed data, the
    # summary the version stage commits) and the champion is read during evaluate
    with registry_slot(params.state_dir):
        data = ingest_flow(params, input_path)
        summary = distill_flow(params, data["data_dir"], run_dir)
        versioned = version_flow(params, input_path, run_id)
        if versioned is not None:
            data = {**data, "dvc_data_version": versioned["version"],
                    "dvc_hashes": versioned["hashes"]}
        fitted = fit_flow(params, data["data_dir"], summary["summary_path"], run_dir)
        evaluation = evaluate_flow(params, data["data_dir"])
        registered = register_flow(params, run_dir, data, summary, fitted, evaluation, run_id)
        promotion = promote_flow(params, registered, fitted, evaluation)

    result = {
        "model_name": registered["model_name"], "version": registered["version"],
        "run_id": registered["run_id"], "flow_run_id": run_id, "run_dir": run_dir,
        "data_version": data.get("dvc_data_version") or data["data_version"],
        "summary_hash": summary["summary_hash"],
        "fitted": {k: fitted[k] for k in ("lambda", "val", "test")}, "evaluation": evaluation,
        **promotion,
    }
    publish_report(result)
    return result


def run_pipeline(params: Params, input_path: Optional[str | Path] = None) -> dict[str, Any]:
    """Entry for the CLI and tests: resolve the params once, run the flow, return its result."""
    source = None if input_path is None else str(Path(input_path).resolve())
    return pipeline(params.resolved(), source)
