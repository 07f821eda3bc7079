"""Register stage: log the run to MLflow and register the candidate as a new model version."""

from __future__ import annotations

from typing import Any

from prefect import flow

from infrec.config import Params
from tasks.prefect_tasks import lineage_tags, log_run, register_version


@flow(name="register")
def register_flow(params: Params, run_dir: str, data: dict[str, Any], summary: dict[str, Any],
                  fitted: dict[str, Any], evaluation: dict[str, Any],
                  flow_run_id: str) -> dict[str, Any]:
    uri = params.tracking_uri()
    logged = log_run(
        tracking_uri=uri, experiment=params.registry.experiment,
        artifact_root=str(params.artifact_root()), run_dir=run_dir,
        params=params.model_dump(mode="json"), data=data, summary=summary, fitted=fitted,
        evaluation=evaluation, flow_run_id=flow_run_id,
    )
    tags = lineage_tags(params.model_dump(mode="json"), data, summary, flow_run_id)
    tags["mlflow_run_id"] = logged["run_id"]
    version = register_version(uri, logged["model_uri"], params.registry.model_name, tags)
    return {**logged, "version": version, "model_name": params.registry.model_name}
