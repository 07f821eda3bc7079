"""Data-version commands: ``versions``, ``rollback``, ``lineage``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from infrec.common import fail, guarded, load, locked, params_option, stoppable


def versions(
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list, oldest first."),
    params: Optional[Path] = params_option(),
) -> None:
    """List data versions: id, created, input file, DVC hashes, size, and the model versions
    trained on each with their gate verdicts (* = champion)."""
    import warnings

    from tasks.rollback import versions_table

    p = load(params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = guarded(versions_table, p)
    for w in caught:
        typer.echo(f"warning: {w.message}", err=True)
    if as_json:
        typer.echo(json.dumps([{k: v for k, v in r.items() if k != "info"} for r in rows],
                              indent=2, ensure_ascii=False))
        return
    if not rows:
        typer.echo("no data versions yet (versioning.enabled: true, then `infrec run`)")
        return
    for r in rows:
        models = ", ".join(
            f"v{m['version']}{'*' if m['champion'] else ''}"
            f"({'pass' if m['gate_passed'] == 'true' else 'fail' if m['gate_passed'] else '?'})"
            for m in r["model_versions"]) or "-"
        source = (r.get("input") or {}).get("name") or "-"
        sha = ((r.get("input") or {}).get("sha256") or "")[:8]
        hashes = " ".join(f"{Path(k).name}={(v or '')[:8]}" for k, v in r["hashes"].items())
        typer.echo(f"{r['version']:>4}  {r['created']}  input {source} {sha}  "
                   f"{r['size'] / 1e6:7.2f} MB  {hashes}  catalogue {r.get('catalogue') or '-'}"
                   f"  models: {models}")
    typer.echo("(* = champion)")


def rollback(
    version: str = typer.Argument(..., help="Data version to restore, e.g. v1 "
                                  "(see `infrec versions`)."),
    reason: Optional[str] = typer.Option(None, "--reason", help="Why (recorded in the registry "
                                         "and in <state_dir>/version_log.jsonl)."),
    force: bool = typer.Option(False, "--force", help="When no gate-passed model was trained on "
                               "that data and the refitted one fails its gates: promote it "
                               "anyway (needs --reason)."),
    wait: float = typer.Option(600, "--wait", help="Seconds to wait for the writer lock (a "
                               "running pipeline holds it)."),
    params: Optional[Path] = params_option(),
) -> None:
    """Restore a data version (input snapshot, processed data, summary, model, reports,
    dvc.lock), verified against its recorded hashes, and make a gate-passed model trained on it
    the champion — all or nothing."""
    from tasks.rollback import rollback as do_rollback

    if force and not (reason and reason.strip()):
        fail("--force needs --reason (it is recorded with who forced the rollback)")
    p = load(params)
    with stoppable("infrec rollback", defer="rollback"), locked(p, wait):
        event = guarded(do_rollback, p, version, reason, force=force)
    refit = " (refitted: no gate-passed model was trained on it)" if event["refitted"] else ""
    forced = " FORCED" if event["forced"] else ""
    typer.echo(f"rolled back to data {event['data_version']}{refit}{forced}: champion is now "
               f"{p.registry.model_name} version {event['champion']} "
               f"(was {event['from_champion'] or 'none'})")
    restored = event.get("params_restored") or []
    typer.echo(f"params.yaml: {len(restored)} key(s) restored to {event['data_version']}'s values"
               + (f" ({', '.join(restored)})" if restored else "") + "; state_dir, reports_dir, "
               "registry, tracking, schedule, versioning and serving kept as they are")
    if event.get("log_changed"):
        typer.echo(f"note: {event['log_changed']} has changed since {event['data_version']} (its "
                   f"content is not that version's input): `dvc status` shows the ingest stage "
                   "changed, and the next run ingests the file as it is now")


def lineage_table(info: dict) -> str:
    """``infrec lineage`` as a plain UTF-8 table: one row per fact, the gate reasons below."""
    gate = info.get("gate") or {}
    verdict = {"true": "passed", "false": "failed"}.get(gate.get("passed") or "", "no verdict")
    inp = info.get("input") or {}
    rows = [
        ("model", f"{info['name']} version {info['version']}  ({info['model_uri']})"),
        ("aliases", ", ".join(info.get("aliases") or []) or "-"),
        ("input file", f"{inp.get('source') or '-'}  sha256 {inp.get('sha256') or '-'}"),
        ("data version", f"{info.get('data_version') or '-'}  (data hash "
                         f"{info.get('data_hash') or '-'})"),
        ("catalogue", info.get("catalogue") or "-"),
        ("summary hash", info.get("summary_hash") or "-"),
        ("params hash", info.get("params_hash") or "-"),
        ("code commit", info.get("git_commit") or "-"),
        ("Prefect flow run", info.get("prefect_flow_run_id") or "-"),
        ("MLflow run", info.get("mlflow_run_id") or "-"),
        ("gates", f"{verdict} on {gate.get('metric') or '-'}; promoted "
                  f"{gate.get('promoted') or '-'}; {gate.get('state') or '-'}"),
    ]
    rows += [("", reason) for reason in gate.get("reasons") or []]
    if info.get("refit"):
        rows.append(("refit", info["refit"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}".rstrip() for k, v in rows)


def lineage(
    model_uri: Optional[str] = typer.Argument(
        None, help="models:/NAME@ALIAS or models:/NAME/VERSION (default: the champion)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    params: Optional[Path] = params_option(),
) -> None:
    """A model version's lineage: input file hash, data version, summary hash, params hash, code
    commit, Prefect flow run, MLflow run, aliases and gate verdict (a table; JSON with --json)."""
    from tasks.rollback import lineage as get_lineage

    p = load(params)
    uri = model_uri or f"models:/{p.registry.model_name}@champion"
    info = guarded(get_lineage, p, uri)
    typer.echo(json.dumps(info, indent=2, ensure_ascii=False) if as_json else lineage_table(info))


def register(app: typer.Typer) -> None:
    for fn in (versions, rollback, lineage):
        app.command()(fn)
