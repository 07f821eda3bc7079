"""The ``infrec`` command line (Typer): a thin layer over the stage modules in ``tasks/`` and the
flows in ``flows/``; nothing imports it. Heavy imports happen inside commands, never at start-up.
"""

from __future__ import annotations

import sys

import typer

from infrec import cmd_pipeline, cmd_scale, cmd_schedule, cmd_stages, cmd_versions

app = typer.Typer(
    help="infrec: ∞-AE and Distill-CF recommendation as a Prefect / MLflow / DVC pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help text, paragraphs re-wrapped to the terminal
)



@app.callback()
def _before_any_command() -> None:
    """Environment defaults before any command imports NumPy (OpenBLAS reads its thread count
    once, at load: a stage gives the same bits whichever entry point runs it)."""
    import os

    from tasks.runtime import process_defaults

    os.environ.update(process_defaults())


for module in (cmd_pipeline, cmd_stages, cmd_versions, cmd_schedule, cmd_scale):
    module.register(app)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
