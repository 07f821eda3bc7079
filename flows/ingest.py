"""Ingest stage: the input file (or the embedded synthetic default) → processed, split data."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from prefect import flow

from infrec.config import Params
from tasks.prefect_tasks import generate_default_data, ingest_data


@flow(name="ingest")
def ingest_flow(params: Params, input_path: Optional[str] = None) -> dict[str, Any]:
    """``input_path`` (None: the generated default data) → ``<state>/data/processed``."""
    state = Path(params.state_dir)
    input_path = input_path or params.ingest.input
    if input_path is None:
        g = params.generate
        input_path = generate_default_data(str(state / "data" / "raw" / "interactions.csv"),
                                           g.users, g.items, g.seed)
    return ingest_data(input_path, str(state / "data" / "processed"), params.ingest.seed,
                       params.ingest.min_rating)
