"""Pipeline commands: ``run``, ``recommend``, ``promote``, ``status``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import typer

from infrec.common import fail, guarded, load, locked, params_option, prefect_api, stoppable


def _metric_line(test: dict[str, float]) -> str:
    keys = ("ndcg@10", "hr@10", "hr@100", "auc")
    return ", ".join(f"{k} {test[k]:.4f}" if k == "auc" else f"{k} {test[k]:.2f}"
                     for k in keys if k in test)


def _quiet_input_errors() -> None:
    """Bad input inside a flow: Prefect's console shows its log line without the traceback (the
    CLI prints the one-line error itself)."""
    import logging

    from tasks.errors import InputError

    class _NoInputErrorTraceback(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            exc = record.exc_info[1] if record.exc_info else None
            if isinstance(exc, InputError):
                record.exc_info, record.exc_text = None, None
            return True

    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_NoInputErrorTraceback())


def sync_input(p, params_path: Optional[Path], input_path: Path):
    """``--input F``: the run's ``ingest.input``. With versioning on and the workspace's own
    params.yaml, F is also written there — DVC reads the ingest stage's params from that file, so
    its record names the file that was read (as ``dvc exp run -S ingest.input=F`` would)."""
    from tasks.params import set_in_file, with_overrides

    p = guarded(with_overrides, p, {"ingest.input": str(input_path)}, "--input")
    if not p.versioning.enabled:
        return p
    from tasks.version import workspace

    root = guarded(workspace, p)
    file = (params_path or Path("params.yaml")).resolve()
    if file != (root / "params.yaml").resolve():
        return p
    spelled = os.path.relpath(input_path.resolve(), root)
    if spelled.startswith(".."):
        spelled = str(input_path.resolve())
    if guarded(set_in_file, file, "ingest.input", spelled):
        typer.echo(f"note: ingest.input set to {spelled} in {file.name} (DVC's record of the "
                   "ingest stage reads it there)", err=True)
    return p


def run(
    input: Optional[Path] = typer.Option(
        None, "--input", "-i", help="Interactions file (ratings.dat, CSV/TSV, Parquet): the "
        "run's ingest.input (default: ingest.input of the params, else the embedded data)."),
    params: Optional[Path] = params_option(),
) -> None:
    """Run the pipeline: ingest → distill → fit → evaluate → version → register → gates →
    promote."""
    p = load(params)
    if input is not None and not input.is_file():
        fail(f"{input}: input file not found")
    from tasks.ingest import validate_params_input

    # before anything is written or started: the whole input file parses (or the first bad line
    # is named; without importing Prefect, so a refusal takes about a second), and versioning
    # has a matching workspace
    guarded(validate_params_input, p, input)
    from tasks.version import check

    guarded(check, p)
    if input is not None:
        p = sync_input(p, params, input)
    from flows.pipeline import run_pipeline

    _quiet_input_errors()
    with stoppable("infrec run", p):  # SIGTERM/SIGINT: the flow ends Cancelled, exit 143/130
        with prefect_api(p):
            result = guarded(run_pipeline, p)
    _print_result(result)


def _print_result(result: dict[str, Any]) -> None:
    name, verdict = result["model_name"], result.get("verdict")
    typer.echo("")
    if result.get("unchanged"):
        champ = result.get("champion")
        typer.echo(f"unchanged: data {result['data_version']}, summary, params and code equal "
                   f"{name} version {result['version']} ({result.get('equals') or '-'}); "
                   f"nothing registered; champion: {'version ' + champ if champ else 'none'}")
        seconds = result.get("seconds") or {}
        if seconds:
            typer.echo("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
        return
    typer.echo(f"registered: {name} version {result['version']} (MLflow run "
               f"{result['run_id']}, data {result['data_version']}, summary "
               f"{result['summary_hash']})")
    typer.echo(f"candidate test: {_metric_line(result['candidate']['test'])}")
    cand = result["evaluation"]["candidate"]
    if cand.get("family"):
        typer.echo(f"  family {cand['selected_because']}; ∞-AE fitted on "
                   f"{'all training users' if cand.get('fit_on') == 'full' else 'the summary'} "
                   f"(fit.on: {cand.get('fit_on_setting')})")
    summary = result["evaluation"]["summary"]
    if "summary_fidelity" in summary and cand.get("fit_on") != "summary":
        typer.echo(f"  ∞-AE on the summary alone: {result['metric']} {summary['summary_test']:.2f}"
                   f", fidelity {summary['summary_fidelity']:.3f} of ∞-AE on all users")
    if "random_users_test" in summary:
        typer.echo(f"  vs {result['distill']['budget']} random users: "
                   f"{result['metric']} {summary['random_users_test']:.2f}; fidelity "
                   f"{summary['fidelity']:.3f}")
    outcome = "PROMOTED to champion" if result["promoted"] else "REJECTED (alias challenger)"
    typer.echo(f"gates ({result['metric']}): {'PASS' if verdict['passed'] else 'FAIL'} → {outcome}")
    for line in verdict["reasons"]:
        typer.echo(f"  {line}")
    if result.get("champion"):
        extra = f", previous v{result['previous']}" if result.get("previous") else ""
        typer.echo(f"champion: {name} version {result['champion']}{extra}")
    else:
        typer.echo("champion: none (no version has passed the gates yet)")
    seconds = result.get("seconds") or {}
    if seconds:
        typer.echo("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    peak = result.get("peak_rss_mb") or {}
    if peak:
        typer.echo("peak RSS MB (after each stage): "
                   + ", ".join(f"{k} {v:.0f}" for k, v in peak.items()))


def _parse_history(text: str) -> list[int]:
    out = []
    for token in text.replace(" ", ",").split(","):
        if not token:
            continue
        try:
            value = int(token)
        except ValueError:
            fail(f"--history: expected comma-separated integer item ids, got {token[:40]!r}")
        if not -(2**63) <= value < 2**63:
            fail(f"--history: item id {token[:40]} is out of the 64-bit integer range")
        out.append(value)
    if not out:
        fail("--history: empty (give at least one item id)")
    return out


def _user_history(p, raw_user: str, version_tags: dict[str, str]) -> list[int]:
    """All known interactions (train + val + test) of a user in the data the champion was
    trained on (its data version, restored read-only from the DVC cache when it is not the
    workspace's current data)."""
    import tempfile

    import numpy as np

    from tasks.data import load_dataset
    from tasks.errors import InputError

    try:
        key = int(raw_user)
    except ValueError:
        fail(f"--user: expected an integer user id, got {raw_user[:40]!r}")
    data_hash, data_version = version_tags.get("data_hash"), version_tags.get("data_version")
    current = p.paths().processed
    dataset = None
    try:
        on_disk = load_dataset(current)
        if on_disk.data_version == data_hash:
            dataset = on_disk
    except InputError:
        pass
    tmp = None
    if dataset is None:
        if not data_version:
            fail(f"--user: the champion's data ({data_hash}) is not on disk and was not "
                 "versioned; use --history")
        from tasks.rollback import champion_history_dir

        tmp = tempfile.TemporaryDirectory(prefix="infrec-history-")
        dataset = load_dataset(guarded(champion_history_dir, p, data_version, Path(tmp.name)))
    rows = np.flatnonzero(dataset.user_ids == key)
    if rows.size == 0:
        fail(f"--user {raw_user}: not a user of the champion's data "
             f"({data_version or data_hash})")
    row = int(rows[0])
    cols = np.union1d(np.union1d(dataset.train[row].indices, dataset.val[row].indices),
                      dataset.test[row].indices)
    if tmp is not None:
        tmp.cleanup()
    return [int(x) for x in dataset.item_ids[cols]]


def recommend(
    history: Optional[str] = typer.Option(
        None, "--history", help="Comma-separated raw item ids, e.g. 10,20,30."),
    user: Optional[str] = typer.Option(
        None, "--user", help="Raw id of a user of the champion's data (all their interactions)."),
    k: int = typer.Option(10, "-k", "--k", help="Number of items to recommend (1 … serving.max_k)."),
    alias: str = typer.Option("champion", "--alias", help="Registry alias to load."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    params: Optional[Path] = params_option(),
) -> None:
    """Recommend top-k items with models:/<name>@champion for a history or a known user."""
    if (history is None) == (user is None):
        fail("give exactly one of --history or --user")
    p = load(params)
    if not 1 <= k <= p.serving.max_k:
        fail(f"-k: must be between 1 and {p.serving.max_k} (serving.max_k), got {k}")
    items = _parse_history(history) if history is not None else None
    if items is not None and len(items) > p.serving.max_history:
        fail(f"--history: {len(items)} ids; at most {p.serving.max_history} (serving.max_history)")
    rec, version = guarded(_recommend, p, items, user, k, alias)
    if as_json:
        typer.echo(json.dumps({"model": p.registry.model_name, "version": version, **rec}))
        return
    if rec["unknown"]:
        shown = ", ".join(rec["unknown"][:20]) + (" …" if len(rec["unknown"]) > 20 else "")
        typer.echo(f"note: ignored {len(rec['unknown'])} item id(s) unknown to the model: {shown}",
                   err=True)
    typer.echo(f"# {p.registry.model_name} version {version} ({alias}), top {k}")
    typer.echo("rank\titem\tscore")
    for rank, (item, score) in enumerate(zip(rec["items"], rec["scores"]), start=1):
        typer.echo(f"{rank}\t{item}\t{score:.6f}")


def _recommend(p, items: Optional[list[int]], user: Optional[str], k: int,
               alias: str) -> tuple[dict[str, Any], str]:
    from tasks import registry
    from tasks.errors import InputError
    from tasks.params import redact
    from tasks.serving import InfAEPyfunc, RequestError, parse_rows

    uri, name = p.tracking_uri(), p.registry.model_name
    mv = registry.alias_version(uri, name, alias)
    if mv is None:
        raise InputError(f"no {name}@{alias} in {redact(uri)} (run `infrec run` first)")
    if items is None:
        items = _user_history(p, user, dict(mv.tags or {}))
    model, item_ids, info = registry.load_version_model(uri, f"models:/{name}/{mv.version}")
    limits = p.serving.model_dump()
    pyfunc = InfAEPyfunc().use(model, item_ids, info, limits)  # the served code path
    try:
        histories, ks = parse_rows({"history": [items], "k": [k]}, limits)
        row = pyfunc.recommend(histories, ks)[0]
    except RequestError as exc:
        raise InputError(f"--history: {str(exc).removeprefix('row 0: ')}"
                         if "known to this model" in str(exc) else str(exc)) from None
    return {"history_size": len(items), **row}, str(mv.version)


def promote(
    version: str = typer.Argument(..., help="Model version to promote to champion (e.g. 3)."),
    force: bool = typer.Option(False, "--force", help="Promote even if the gates fail "
                               "(needs --reason)."),
    reason: Optional[str] = typer.Option(None, "--reason", help="Why (recorded, with who, in "
                                         "tags of the version)."),
    wait: float = typer.Option(600, "--wait", help="Seconds to wait for the writer lock."),
    params: Optional[Path] = params_option(),
) -> None:
    """Re-check the gates of VERSION against the champion now; move the champion alias to it if
    they pass (or with --force --reason)."""
    if force and not (reason and reason.strip()):
        fail("--force needs --reason (it is recorded with who forced the promotion)")
    p = load(params)
    from tasks.promote import promote_version

    target = version.strip().lstrip("v")
    if not target.isdigit():
        fail(f"VERSION: expected a model version number, got {version[:40]!r}")
    with stoppable("infrec promote", defer="promote"), locked(p, wait):
        result = guarded(promote_version, p, target, force, reason)
    for line in result["verdict"].reasons:
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


def _dvc_remote() -> Optional[str]:
    """The default DVC remote's URL (credentials redacted; None when DVC is not set up)."""
    import configparser

    from tasks.params import redact

    cfg = configparser.ConfigParser()
    if not cfg.read([".dvc/config", ".dvc/config.local"]):
        return None
    name = cfg.get("core", "remote", fallback=None)
    if not name:
        return None
    return redact(cfg.get(f"'remote \"{name}\"'", "url", fallback=name))


def status(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    params: Optional[Path] = params_option(),
) -> None:
    """Where the state lives, the champion, and the last run with its gate verdict."""
    p = load(params)
    info = guarded(_status, p)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str, ensure_ascii=False))
        return
    typer.echo(f"state dir:        {info['state_dir']}")
    typer.echo(f"MLflow tracking:  {info['tracking_uri']}")
    typer.echo(f"Prefect API:      {info['prefect_api']}")
    typer.echo(f"DVC remote:       {info['dvc_remote'] or 'none'}")
    champ = info["champion"]
    if champ and champ.get("error"):
        typer.echo(f"champion:         {info['model_name']} version {champ['version']} — "
                   f"UNUSABLE: {champ['error']}")
    elif champ:
        typer.echo(f"champion:         {info['model_name']} version {champ['version']} "
                   f"(data {champ['data_version']}; test {_metric_line(champ['test'])})")
    else:
        typer.echo("champion:         none")
    last = info["last_run"]
    if last:
        typer.echo(f"last version:     {last['version']} {last['outcome']} (data "
                   f"{last['data_version']}, MLflow run {last['run_id']})")
        for line in last["reasons"]:
            typer.echo(f"  {line}")
    else:
        typer.echo("last version:     none")
    run = info.get("last_pipeline_run")
    if run:
        name = run.get("flow_run_name") or "-"
        typer.echo(f"last run:         {run['outcome']} — {run['message']} (flow run {name} "
                   f"{run.get('flow_run_id') or ''}, ended {run.get('ended')})")


def _status(p) -> dict[str, Any]:
    from tasks import registry
    from tasks.params import redact

    uri, name = p.tracking_uri(), p.registry.model_name
    champion = None
    mv = registry.alias_version(uri, name, registry.CHAMPION)
    if mv is not None:
        s = registry.version_info(uri, name, str(mv.version))
        champion = {"version": s["version"], "data_version": s["data_version"],
                    "test": s["test"], "val": s["val"], "run_id": s["run_id"]}
        try:
            registry.load_version_model(uri, f"models:/{name}/{mv.version}")
        except Exception as exc:  # noqa: BLE001 - InputError: the champion cannot be loaded
            champion["error"] = str(exc)
    last_run = None
    latest = registry.latest_version(uri, name)
    if latest is not None:
        s = registry.version_info(uri, name, latest)
        tags = s["tags"]
        reasons = tags.get("gate.reasons")
        decided = bool(reasons) and reasons != "-"
        state = tags.get(registry.STATE_TAG)
        aliases = s["aliases"]
        outcome = ("champion" if registry.CHAMPION in aliases else
                   "incomplete (its run was interrupted)" if state == registry.INCOMPLETE else
                   "rejected" if tags.get("gate.passed") == "false" else
                   "passed, not champion" if tags.get("gate.passed") == "true" else "undecided")
        last_run = {"version": latest, "run_id": s["run_id"], "data_version": s["data_version"],
                    "outcome": outcome, "promoted": registry.CHAMPION in aliases,
                    "gate_passed": tags.get("gate.passed") == "true",
                    "reasons": reasons.splitlines() if decided else ["no gate verdict recorded"],
                    "aliases": aliases, "test": s["test"]}
    from tasks.recovery import last_run as last_pipeline_run

    return {"state_dir": str(p.state_path()), "tracking_uri": redact(uri), "model_name": name,
            "prefect_api": _prefect_api(p), "dvc_remote": _dvc_remote(), "champion": champion,
            "last_run": last_run, "last_pipeline_run": last_pipeline_run(p.state_path())}


def _prefect_api(p) -> str:
    from infrec.common import DEFAULT_PREFECT_PORT, api_url, configured_api_url, is_healthy

    url = configured_api_url()
    if url:
        return url
    local = api_url(DEFAULT_PREFECT_PORT)
    if is_healthy(local, timeout=0.5):
        return f"{local} (infrec server)"
    return f"none running (runs start a temporary server; history in {p.state_path()}/prefect)"


def register(app: typer.Typer) -> None:
    for fn in (run, recommend, promote, status):
        app.command()(fn)
