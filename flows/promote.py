"""Promote stage: decide the gates (pure) and move the aliases accordingly."""

from __future__ import annotations

from typing import Any

from prefect import flow

from infrec.config import Params
from tasks.prefect_tasks import apply_verdict, decide_gates


@flow(name="promote")
def promote_flow(params: Params, registered: dict[str, Any], fitted: dict[str, Any],
                 evaluation: dict[str, Any]) -> dict[str, Any]:
    verdict = decide_gates(evaluation, fitted, params.gates.model_dump())
    moved = apply_verdict(params.tracking_uri(), registered["model_name"], registered["version"],
                          verdict, registered["run_id"])
    return {"verdict": verdict, **moved}
