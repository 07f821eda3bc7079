"""Data-version commands: ``versions``, ``rollback``, ``lineage``. Light imports at module level."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from infrec.cmd_pipeline import PARAMS_HELP, _cli, _params


def versions(
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list, oldest first."),
    params: Optional[Path] = typer.Option(None, "--params", "-p", help=PARAMS_HELP),
) -> None:
    """List data versions: id, created, DVC hashes, size, model versions trained on each, champion."""
    from tasks.rollback import versions_table

    p = _params(params)
    rows = _cli()._run_guarded(versions_table, p.versioning.workspace, p.tracking_uri(),
                               p.registry.model_name)
    if as_json:
        typer.echo(json.dumps([{k: v for k, v in r.items() if k != "info"} for r in rows], indent=2))
        return
    if not rows:
        typer.echo("no data versions yet (enable versioning in params.yaml and run `infrec run`)")
        return
    for r in rows:
        models = ", ".join(
            f"v{m['version']}{'*' if m['champion'] else ''}"
            f"({'pass' if m['gate_passed'] == 'true' else 'fail' if m['gate_passed'] else '?'})"
            for m in r["model_versions"]) or "-"
        hashes = " ".join(f"{Path(k).name}={v[:8]}" for k, v in r["hashes"].items())
        typer.echo(f"{r['version']:>4}  {r['created']}  {r['size'] / 1e6:7.2f} MB  {hashes}  "
                   f"models: {models}")
    typer.echo("(* = champion)")


def rollback(
    version: str = typer.Argument(..., help="Data version to restore, e.g. v1 (see `infrec versions`)."),
    reason: Optional[str] = typer.Option(None, "--reason", help="Why (recorded in the registry)."),
    params: Optional[Path] = typer.Option(None, "--params", "-p", help=PARAMS_HELP),
) -> None:
    """Restore a data version's processed data and summary and make its model the champion.

    Refits ∞-AE on the restored data when no model version was trained on it. All or nothing:
    if any step fails (remote unreachable, registry error), the workspace and the
    registry are left as they were.
    """
    from tasks.rollback import rollback as do_rollback

    p = _params(params)
    event = _cli()._run_guarded(do_rollback, p.versioning.workspace, version, p.tracking_uri(),
                                p.registry.model_name, p.state_dir, reason,
                                experiment=p.registry.experiment, depth=p.fit.depth,
                                lambdas=list(p.fit.summary_lambdas))
    refit = " (refitted: no model version was trained on it)" if event["refitted"] else ""
    typer.echo(f"rolled back to data {event['data_version']}{refit}: champion is now "
               f"{p.registry.model_name} version {event['champion']} "
               f"(was {event['from_champion'] or 'none'})")


def lineage(
    model_uri: Optional[str] = typer.Argument(
        None, help="models:/NAME@ALIAS or models:/NAME/VERSION (default: the champion)."),
    params: Optional[Path] = typer.Option(None, "--params", "-p", help=PARAMS_HELP),
) -> None:
    """Print a model version's lineage: data version, DVC hashes, git commit, params hash, flow run."""
    from tasks.rollback import lineage as get_lineage

    p = _params(params)
    uri = model_uri or f"models:/{p.registry.model_name}@champion"
    info = _cli()._run_guarded(get_lineage, p.tracking_uri(), uri)
    typer.echo(json.dumps(info, indent=2))


def register(app: typer.Typer) -> None:
    app.command()(versions)
    app.command()(rollback)
    app.command()(lineage)
