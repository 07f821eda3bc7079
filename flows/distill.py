"""Distill stage: processed data → a small data summary (Distill-CF, or a sampler baseline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from infrec.config import Params
from tasks.prefect_tasks import distill_summary


@flow(name="distill")
def distill_flow(params: Params, data_dir: str, run_dir: str) -> dict[str, Any]:
    # the stage paths of dvc.yaml (one code path with `dvc repro`); the run dir keeps the model
    paths = params.stage_paths()
    return distill_summary(data_dir, paths["summary"], paths["distill_log"],
                           params.distill.model_dump())
