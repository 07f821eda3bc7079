"""Pipeline commands: ``run``, ``recommend``, ``promote``, ``status``.

Only typer and the standard library at module level: Prefect, MLflow and JAX are imported inside
the commands, after :func:`infrec.config.runtime_environment` is applied.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import typer

PARAMS_HELP = "Parameters file (default: ./params.yaml if present, else built-in defaults)."


def _cli():
    from infrec import cli

    return cli


def _params(path: Optional[Path]):
    """Parse params.yaml once, apply the runtime environment, return resolved params."""
    from infrec.config import load_params, process_defaults, runtime_environment

    os.environ.update(process_defaults())  # before anything imports NumPy
    params = _cli()._run_guarded(load_params, path)
    env = runtime_environment(params)
    if "PREFECT_HOME" in env:  # Prefect creates only the leaf directory
        Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    return params.resolved()


def _quiet_input_errors() -> None:
    """Bad input inside a flow: Prefect's console shows its log lines without the traceback (the
    CLI prints the one-line error itself). The API log handlers run first and keep it."""
    import logging

    from tasks.errors import InputError

    class _NoInputErrorTraceback(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            exc = record.exc_info[1] if record.exc_info else None
            if isinstance(exc, InputError):
                record.exc_info, record.exc_text = None, None
            return True

    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.addFilter(_NoInputErrorTraceback())


def _metric_line(test: dict[str, float]) -> str:
    keys = ("ndcg@10", "hr@10", "hr@100", "auc")
    return ", ".join(f"{k} {test[k]:.4f}" if k == "auc" else f"{k} {test[k]:.2f}"
                     for k in keys if k in test)


def run(
    input: Optional[Path] = typer.Option(
        None, "--input", "-i", help="Interactions file (default: the embedded synthetic data set)."
    ),
    params: Optional[Path] = typer.Option(None, "--params", "-p", help=PARAMS_HELP),
) -> None:
    """Run the pipeline: ingest → distill → fit → evaluate → register → gate → promote."""
    cli = _cli()
    p = _params(params)
    if input is not None and not input.is_file():
        cli._fail(f"{input}: input file not found")
    from flows.pipeline import run_pipeline

    _quiet_input_errors()
    result = cli._run_guarded(run_pipeline, p, input)
    verdict = result["verdict"]
    typer.echo("")
    typer.echo(f"registered: {result['model_name']} version {result['version']} "
               f"(MLflow run {result['run_id']}, data {result['data_version']}, "
               f"summary {result['summary_hash']})")
    typer.echo(f"candidate test: {_metric_line(result['fitted']['test'])}")
    outcome = "PROMOTED to champion" if result["promoted"] else "REJECTED (alias challenger)"
    typer.echo(f"gates: {'PASS' if verdict['passed'] else 'FAIL'} → {outcome}")
    for line in verdict["reasons"]:
        typer.echo(f"  {line}")
    champion = result.get("champion")
    if champion:
        extra = f", previous v{result['previous']}" if result.get("previous") else ""
        typer.echo(f"champion: {result['model_name']} version {champion}{extra}")
    else:
        typer.echo("champion: none (no version has passed the gates yet)")


def _parse_history(text: str) -> list[int]:
    out = []
    for token in text.replace(" ", ",").split(","):
        if not token:
            continue
        try:
            out.append(int(token))
        except ValueError:
            _cli()._fail(f"--history: expected comma-separated integer item ids, got {token!r}")
    return out


def _user_history(p, raw_user: str) -> list[int]:
    """All known interactions (train + val + test) of a user of the ingested data."""
    import numpy as np

    from tasks.data import load_dataset

    data_dir = Path(p.state_dir) / "data" / "processed"
    dataset = load_dataset(data_dir)
    try:
        key = int(raw_user)
    except ValueError:
        _cli()._fail(f"--user: expected an integer user id, got {raw_user!r}")
    rows = np.flatnonzero(dataset.user_ids == key)
    if rows.size == 0:
        _cli()._fail(f"--user {raw_user}: not a user of the ingested data in {data_dir}")
    row = int(rows[0])
    cols = np.union1d(np.union1d(dataset.train[row].indices, dataset.val[row].indices),
                      dataset.test[row].indices)
    return [int(x) for x in dataset.item_ids[cols]]


def recommend(
    history: Optional[str] = typer.Option(
        None, "--history", help="Comma-separated raw item ids, e.g. 10,20,30."
    ),
    user: Optional[str] = typer.Option(
        None, "--user", help="Raw id of a user of the ingested data (all their interactions)."
    ),
    k: int = typer.Option(10, "-k", "--k", min=1, help="Number of items to recommend."),
    model: str = typer.Option("champion", "--alias", help="Registry alias to load."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    params: Optional[Path] = typer.Option(None, "--params", "-p", help=PARAMS_HELP),
) -> None:
    """Recommend top-k items with models:/<name>@champion for a history or a known user."""
    cli = _cli()
    if (history is None) == (user is None):
        cli._fail("give exactly one of --history or --user")
    p = _params(params)
    items = _parse_history(history) if history is not None else _user_history(p, user)
    rec, version = cli._run_guarded(_recommend, p, items, k, model)
    if as_json:
        typer.echo(json.dumps({"model": p.registry.model_name, "version": version,
                               "history": items, **rec}))
        return
    if rec["unknown"]:
        typer.echo(f"note: ignored item ids unknown to the model: {', '.join(rec['unknown'])}",
                   err=True)
    typer.echo(f"# {p.registry.model_name} version {version} ({model}), top {k}")
    typer.echo("rank\titem\tscore")
    for rank, (item, score) in enumerate(zip(rec["items"], rec["scores"]), start=1):
        typer.echo(f"{rank}\t{item}\t{score:.6f}")


def _recommend(p, items: list[int], k: int, alias: str) -> tuple[dict[str, Any], str]:
    import pandas as pd

    from tasks import registry
    from tasks.errors import InputError

    uri, name = p.tracking_uri(), p.registry.model_name
    mv = registry.alias_version(uri, name, alias)
    if mv is None:
        raise InputError(f"no {name}@{alias} in {uri} (run `infrec run` first)")
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}/{mv.version}")
    out = model.predict(pd.DataFrame({"history": [items], "k": [k]}))
    row = out.iloc[0]
    return {"items": [int(x) for x in row["items"]], "scores": [float(x) for x in row["scores"]],
            "unknown": [str(x) for x in row["unknown"]]}, str(mv.version)


def promote(
    version: str = typer.Argument(..., help="Model version to promote to champion."),
    force: bool = typer.Option(
        False, "--force", help="Promote even if the gates fail (needs --reason)."
    ),
    reason: Optional[str] = typer.Option(
        None, "--reason", help="Why (recorded, with who, in tags of the version)."
    ),
    params: Optional[Path] = typer.Option(None, "--params", "-p", help=PARAMS_HELP),
) -> None:
    """Re-check the gates for VERSION and move the champion alias to it if they pass."""
    cli = _cli()
    if force and not (reason and reason.strip()):
        cli._fail("--force needs --reason (it is recorded with who forced the promotion)")
    p = _params(params)
    result = cli._run_guarded(_promote, p, version.strip().lstrip("v"), force, reason)
    verdict = result["verdict"]
    for line in verdict.reasons:
        typer.echo(f"  {line}")
    name = p.registry.model_name
    if result["promoted"]:
        forced = f" (FORCED by {result['forced_by']}: {reason})" if result.get("forced_by") else ""
        typer.echo(f"champion: {name} version {result['champion']}{forced}"
                   + (f", previous v{result['previous']}" if result.get("previous") else ""))
        return
    champ = result.get("champion")
    typer.echo(f"not promoted: gates fail; champion stays {'v' + champ if champ else 'unset'} "
               "(use --force --reason ... to override)", err=True)
    raise typer.Exit(code=1)


def _promote(p, version: str, force: bool, reason: Optional[str]) -> dict[str, Any]:
    import getpass

    from tasks import registry
    from tasks.errors import InputError
    from tasks.gates import GateThresholds, decide_gates

    uri, name = p.tracking_uri(), p.registry.model_name
    champ = registry.alias_version(uri, name, registry.CHAMPION)
    if champ is not None and str(champ.version) == version:
        raise InputError(f"{name} version {version} is already the champion")
    thresholds = GateThresholds.from_params(p.gates)
    inputs = registry.recheck_gate_inputs(uri, name, version, thresholds.metric)
    verdict = decide_gates(inputs, thresholds)
    if not verdict.passed and not force:
        return {"verdict": verdict, "promoted": False,
                "champion": str(champ.version) if champ is not None else None}
    who = None
    if not verdict.passed:
        try:
            who = getpass.getuser()
        except Exception:  # noqa: BLE001 - no user name in this environment
            who = "unknown"
    moved = registry.apply_verdict(uri, name, version, passed=verdict.passed,
                                   reasons=verdict.reasons, forced_by=who, force_reason=reason)
    return {"verdict": verdict, "forced_by": who, **moved}


def _dvc_remote() -> Optional[str]:
    """The default DVC remote's URL from ``.dvc/config`` (None when DVC is not set up)."""
    import configparser

    cfg = configparser.ConfigParser()
    read = cfg.read([".dvc/config", ".dvc/config.local"])
    if not read:
        return None
    name = cfg.get("core", "remote", fallback=None)
    if not name:
        return None
    return cfg.get(f"'remote \"{name}\"'", "url", fallback=name)


def status(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    params: Optional[Path] = typer.Option(None, "--params", "-p", help=PARAMS_HELP),
) -> None:
    """Where the state lives, the champion, and the last run with its gate verdict."""
    cli = _cli()
    p = _params(params)
    info = cli._run_guarded(_status, p)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    typer.echo(f"state dir:        {info['state_dir']}")
    typer.echo(f"MLflow tracking:  {info['tracking_uri']}")
    typer.echo(f"Prefect API:      {info['prefect_api']}")
    typer.echo(f"DVC remote:       {info['dvc_remote'] or 'none'}")
    champ = info["champion"]
    if champ:
        typer.echo(f"champion:         {info['model_name']} version {champ['version']} "
                   f"(data {champ['data_version']}; test {_metric_line(champ['test'])})")
    else:
        typer.echo("champion:         none")
    last = info["last_run"]
    if last:
        outcome = "promoted" if last["promoted"] else "not promoted"
        typer.echo(f"last run:         version {last['version']} {outcome} "
                   f"(MLflow run {last['run_id']})")
        for line in last["reasons"]:
            typer.echo(f"  {line}")
    else:
        typer.echo("last run:         none")


def _prefect_api() -> str:
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        from prefect.settings import get_current_settings

        url = get_current_settings().api.url
    if url:
        return str(url)
    return f"ephemeral (local, PREFECT_HOME={os.environ.get('PREFECT_HOME', '~/.prefect')})"


def _status(p) -> dict[str, Any]:
    from tasks import registry

    uri, name = p.tracking_uri(), p.registry.model_name
    champion = None
    mv = registry.alias_version(uri, name, registry.CHAMPION)
    if mv is not None:
        s = registry.version_summary(uri, name, str(mv.version))
        champion = {"version": s["version"], "data_version": s["data_version"],
                    "test": s.get("test", {}), "val": s.get("val", {}), "run_id": s["run_id"]}
    last_run = None
    latest = registry.latest_version(uri, name)
    if latest is not None:
        s = registry.version_summary(uri, name, latest)
        tags = s["tags"]
        reasons = tags.get("gate.reasons")
        recorded = bool(reasons) and reasons != "-"
        reasons = reasons.splitlines() if recorded else ["no gate verdict recorded"]
        last_run = {
            "version": latest, "run_id": s["run_id"], "data_version": s["data_version"],
            "promoted": tags.get("promoted") == "true",
            "gate_passed": tags.get("gate.passed") == "true", "reasons": reasons,
            "aliases": s["aliases"], "test": s.get("test", {}),
        }
    return {
        "state_dir": p.state_dir, "tracking_uri": uri, "model_name": name,
        "prefect_api": _prefect_api(), "dvc_remote": _dvc_remote(),
        "champion": champion, "last_run": last_run,
    }


def register(app: typer.Typer) -> None:
    app.command()(run)
    app.command()(recommend)
    app.command()(promote)
    app.command()(status)
