"""Generate stage: the embedded default input, a deterministic synthetic interactions CSV.

``run(params)`` writes ``<state_dir>/data/raw/interactions.csv`` from ``generate.*`` (the same
parameters give the same bytes on every machine). The ingest stage reads it when
``ingest.input`` is not set. Entry points: the Prefect task :func:`generate_task` and
``infrec generate --params params.yaml`` (dvc.yaml's ``generate`` stage) — both call ``run``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from prefect import task

from tasks.params import Params
from tasks.runtime import say, task_options
from tasks.synthetic import write_synthetic


def run(params: Params, log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Write the synthetic default data set; returns ``{path, rows, users, items}``."""
    log = log or say()
    g = params.generate
    out = params.paths().generated
    stats = write_synthetic(out, n_users=g.users, n_items=g.items, seed=g.seed)
    log(f"generated {stats['rows']} interactions ({stats['users']} users × {stats['items']} "
        f"items, seed {g.seed}) → {out}")
    return stats


@task(name="generate", **task_options())
def generate_task(params: Params) -> dict[str, Any]:
    return run(params)


__all__ = ["run", "generate_task"]
