"""Fit stage: ∞-AE on the summary (the candidate), λ chosen on validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from infrec.config import Params
from tasks.prefect_tasks import fit_candidate


@flow(name="fit")
def fit_flow(params: Params, data_dir: str, summary_path: str, run_dir: str) -> dict[str, Any]:
    model_dir = str(Path(run_dir) / "model")
    return fit_candidate(data_dir, summary_path, model_dir, params.fit.model_dump())
