"""``--params params.yaml`` for the stage commands: their option defaults from params.yaml.

dvc.yaml runs ``infrec <stage> --params params.yaml``, which takes exactly the values and paths
the Prefect pipeline uses (:func:`infrec.config.stage_defaults`); options given explicitly win.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer


def _stage_params(ctx: typer.Context, value: Optional[Path]) -> Optional[Path]:
    """Eager ``--params``: this stage's option defaults from a params.yaml (explicit options win)."""
    if value is None:
        return value
    from infrec.config import load_params, stage_defaults

    params = _guarded_load(load_params, value)
    ctx.default_map = {**(ctx.default_map or {}), **stage_defaults(ctx.command.name, params)}
    return value


def params_option() -> Any:
    return typer.Option(
        None, "--params", "-p", is_eager=True, callback=_stage_params,
        help="Take this stage's options from a params.yaml, exactly as `infrec run` and dvc.yaml "
        "do (paths under state_dir); options given explicitly win.",
    )


def _guarded_load(load, value):
    from infrec.cli import _run_guarded

    return _run_guarded(load, value)
