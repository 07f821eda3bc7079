"""Version stage: DVC-commit and push the processed data and summary, record a data version."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from prefect import flow
from prefect.logging import get_run_logger

from infrec.config import Params
from tasks.prefect_tasks import record_data_version


@flow(name="version")
def version_flow(params: Params, input_path: Optional[str], flow_run_id: str) -> Optional[dict[str, Any]]:
    """Skipped (None) unless ``versioning.enabled`` and the input is the one dvc.yaml reads."""
    if not params.versioning.enabled:
        return None
    expected = Path(params.raw_input()).resolve()
    if input_path is not None and Path(input_path).resolve() != expected:
        get_run_logger().warning(
            f"data not DVC-versioned: --input {input_path} is not the ingest stage's input "
            f"{expected} (set ingest.input in params.yaml to version it)")
        return None
    info = {"flow_run_id": flow_run_id, "generated": params.ingest.input is None}
    return record_data_version(params.versioning.workspace, params.state_dir, info)
