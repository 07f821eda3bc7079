"""Evaluate stage: what the gates compare the candidate with — baselines, reference, champion."""

from __future__ import annotations

from typing import Any

from prefect import flow

from infrec.config import Params
from tasks.prefect_tasks import evaluate_baselines, evaluate_champion, fit_reference


@flow(name="evaluate")
def evaluate_flow(params: Params, data_dir: str) -> dict[str, Any]:
    ev = params.evaluate
    return {
        "baselines": evaluate_baselines(data_dir, ev.ease_lambdas),
        "reference": fit_reference(data_dir, ev.reference_max_users, ev.reference_seed,
                                   params.fit.model_dump()),
        "champion": evaluate_champion(data_dir, params.tracking_uri(), params.registry.model_name),
    }
