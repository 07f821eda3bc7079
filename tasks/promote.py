"""Promote stage: the gates decide, the aliases follow.

``run(params, registered)`` (the pipeline) and :func:`promote_version` (``infrec promote
VERSION``) build the gate inputs the same way (:func:`tasks.gates.gate_inputs` from the
evaluate stage's ``evaluation.json``, and :func:`champion_comparison`), decide with the pure
:func:`tasks.gates.decide_gates`, and record the verdict with :func:`apply_verdict`:

1. the version's and its run's tags (``gate.passed``, ``gate.reasons``), the run's per-gate
   metrics (``gate/<name>/value``, ``gate/<name>/threshold``, ``gate/<name>/passed``) and its
   description — facts that stay true whatever happens next;
2. the aliases (:func:`tasks.registry.move_aliases`): ``champion`` moves only on a pass (or a
   recorded ``--force --reason``);
3. only then ``promoted`` and the lifecycle tag ``infrec.state=decided``.

A champion whose artifacts cannot be loaded is not compared: gate (b) is skipped with the
reason, so one corrupt model never blocks every later run or its own replacement.
"""

from __future__ import annotations

import getpass
import tempfile
from typing import Any, Callable, Optional

from prefect import task

from tasks import registry
from tasks.data import Dataset, load_dataset
from tasks.errors import InputError
from tasks.gates import (GateThresholds, Verdict, catalogue_fingerprint, catalogue_overlap,
                         decide_gates, evaluated_users, gate_inputs)
from tasks.io import read_json
from tasks.params import Params
from tasks.runtime import say, task_options


def champion_comparison(params: Params, candidate_version: Optional[str],
                        dataset: Optional[Dataset], candidate_data: Optional[str]
                        ) -> Optional[dict[str, Any]]:
    """The champion's test metrics for gate (b): re-evaluated on ``dataset`` (the candidate's
    data) when given, else its logged test metrics; ``unusable`` when it cannot be loaded;
    ``other_catalogue`` when it knows less than ``gates.min_catalogue_overlap`` of the data's
    items (another catalogue: not compared). None when there is no champion (or the candidate
    is the champion)."""
    from tasks.evaluate import evaluate_model_on

    uri, name = params.tracking_uri(), params.registry.model_name
    champ = registry.alias_version(uri, name, registry.CHAMPION)
    if champ is None or str(champ.version) == str(candidate_version):
        return None
    version = str(champ.version)
    champ_tags = champ.tags or {}
    champ_data = registry.data_version_id(champ_tags)
    if dataset is None:
        test = registry.run_metrics(uri, champ.run_id, "test") if champ.run_id else {}
        return {"version": version, "test": test or None,
                "note": f"logged test metrics (data {champ_data}); the candidate's data is no "
                        "longer on disk"}
    try:
        model, item_ids, _ = registry.load_version_model(uri, f"models:/{name}/{version}")
    except InputError as exc:
        return {"version": version, "test": None, "unusable": str(exc)}
    overlap = catalogue_overlap(item_ids, dataset.item_ids)
    if overlap < params.gates.min_catalogue_overlap:
        return {"version": version, "test": None, "other_catalogue": (
            f"it knows {overlap:.0%} of this data's {dataset.n_items} items, need ≥ "
            f"{params.gates.min_catalogue_overlap:.0%}; catalogue "
            f"{champ_tags.get('catalogue') or catalogue_fingerprint(item_ids)} vs "
            f"{catalogue_fingerprint(dataset.item_ids)}")}
    try:
        test = evaluate_model_on(model, item_ids, dataset, max_users=params.evaluate.max_users,
                                 sample_seed=params.evaluate.sample_seed)
    except InputError as exc:
        return {"version": version, "test": None, "unusable": str(exc)}
    same = champ_tags.get("data_hash") == candidate_data
    note = ("same data version" if same
            else f"trained on data {champ_data}, re-evaluated on this data's test split")
    return {"version": version, "test": test, "note": note}


def record_verdict(params: Params, version: str, verdict: Verdict, run_id: Optional[str], *,
                   forced_by: Optional[str] = None, force_reason: Optional[str] = None) -> None:
    """Step 1 of the module doc: the verdict as tags, run metrics and run description."""
    uri, name = params.tracking_uri(), params.registry.model_name
    text = "\n".join(verdict.reasons) or "-"
    tags = {"gate.passed": str(verdict.passed).lower(), "gate.reasons": text,
            "gate.metric": params.selection.metric}
    if forced_by is not None:
        tags.update({"promotion.forced_by": forced_by, "promotion.reason": force_reason or "-"})
    registry.set_version_tags(uri, name, version, tags)
    if run_id:
        failing = ", ".join(g.name for g in verdict.gates if not g.passed) or "none"
        outcome = ("PROMOTED" if verdict.passed else
                   f"FORCED by {forced_by}: {force_reason}" if forced_by else
                   f"REJECTED (failing: {failing})")
        gate_metrics: dict[str, float] = {"gate/passed": float(verdict.passed)}
        for g in verdict.gates:
            gate_metrics[f"gate/{g.name}/passed"] = float(g.passed)
            if g.value is not None:
                gate_metrics[f"gate/{g.name}/value"] = g.value
            if g.threshold is not None:
                gate_metrics[f"gate/{g.name}/threshold"] = g.threshold
        registry.set_run_outcome(
            uri, run_id, name=name, tags={**tags, "gate.outcome": outcome}, metrics=gate_metrics,
            description=f"{outcome}: {name} v{version}\n\n" + text)


def finish_promotion(params: Params, version: str, promote: bool) -> dict[str, Any]:
    """Steps 2–3: move the aliases, then tag ``promoted`` and ``infrec.state=decided``."""
    uri, name = params.tracking_uri(), params.registry.model_name
    moved = registry.move_aliases(uri, name, version, promote)
    registry.set_version_tags(uri, name, version, {"promoted": str(moved["promoted"]).lower(),
                                                    registry.STATE_TAG: registry.DECIDED})
    return moved


def apply_verdict(params: Params, version: str, verdict: Verdict, run_id: Optional[str], *,
                  forced_by: Optional[str] = None, force_reason: Optional[str] = None
                  ) -> dict[str, Any]:
    """Record ``verdict`` on ``version`` and move the aliases (order: see the module doc)."""
    record_verdict(params, version, verdict, run_id, forced_by=forced_by,
                   force_reason=force_reason)
    return finish_promotion(params, version, verdict.passed or forced_by is not None)


def decide(params: Params, evaluation: dict[str, Any], champion: Optional[dict[str, Any]],
           eval_users: Optional[int] = None) -> Verdict:
    """The verdict for an evaluate-stage report against ``champion`` (pure); ``eval_users``:
    the test users it was evaluated on (:func:`tasks.gates.evaluated_users`)."""
    return decide_gates(gate_inputs(evaluation, params.selection.metric, champion, eval_users),
                        GateThresholds.from_params(params))


def run(params: Params, registered: dict[str, Any],
        log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """The pipeline's promotion of the version ``registered`` (the register stage's output)."""
    log = log or say()
    if registered.get("unchanged"):
        champ = registry.alias_version(params.tracking_uri(), params.registry.model_name,
                                       registry.CHAMPION)
        champion = str(champ.version) if champ is not None else None
        log(f"unchanged candidate (equals {registered.get('equals') or 'v' + registered['version']})"
            f": champion stays {'v' + champion if champion else 'unset'}")
        return {"unchanged": True, "promoted": False, "verdict": None, "champion": champion,
                "previous": None, "equals": registered.get("equals")}
    paths = params.paths()
    evaluation = read_json(paths.evaluation, "the evaluate stage's report")
    dataset = load_dataset(paths.processed)
    champion = champion_comparison(params, registered["version"], dataset, dataset.data_version)
    verdict = decide(params, evaluation, champion, evaluated_users(dataset))
    for line in verdict.reasons:
        log(line)
    moved = apply_verdict(params, registered["version"], verdict, registered.get("run_id"))
    name = params.registry.model_name
    if moved["promoted"]:
        log(f"{name}: champion → v{registered['version']}"
            + (f" (previous → v{moved['previous']})" if moved["previous"] else ""))
    else:
        log(f"{name}: v{registered['version']} → challenger; champion stays "
            f"{'v' + moved['champion'] if moved['champion'] else 'unset'}")
    return {"unchanged": False, "verdict": verdict.to_dict(), **moved}


def promote_version(params: Params, version: str, force: bool = False,
                    reason: Optional[str] = None) -> dict[str, Any]:
    """``infrec promote VERSION``: re-check the gates of a registered version against the
    champion now; move ``champion`` on a pass, or with ``force`` and a reason (recorded)."""
    uri, name = params.tracking_uri(), params.registry.model_name
    mv = registry.get_version(uri, name, version)
    tags = mv.tags or {}
    champ = registry.alias_version(uri, name, registry.CHAMPION)
    if champ is not None and str(champ.version) == str(mv.version):
        raise InputError(f"{name} version {version} is already the champion")
    if tags.get(registry.STATE_TAG) == registry.INCOMPLETE and not force:
        raise InputError(f"{name} version {version} is incomplete (its run was interrupted); "
                         "it is never promoted without --force --reason")
    if not mv.run_id:
        raise InputError(f"{name} version {version}: has no MLflow run (not registered by infrec)")
    with tempfile.TemporaryDirectory(prefix="infrec-promote-") as tmp:
        try:
            evaluation = read_json(registry.download(uri, mv.run_id, "reports/evaluation.json",
                                                     tmp), "the version's evaluation")
        except InputError:
            raise
        except Exception:  # noqa: BLE001 - artifact missing in the store
            raise InputError(f"{name} version {version}: its run has no reports/evaluation.json "
                             "artifact (registered by an older infrec?)") from None
    dataset = None
    try:
        on_disk = load_dataset(params.paths().processed)
        if on_disk.data_version == tags.get("data_hash"):
            dataset = on_disk
    except InputError:
        pass
    champion = champion_comparison(params, str(mv.version), dataset, tags.get("data_hash"))
    # the test users it was evaluated on: from its data when on disk, else its registration tag
    eval_users = evaluated_users(dataset) if dataset is not None else tags.get("eval_users")
    verdict = decide(params, evaluation, champion, eval_users)
    if not verdict.passed and not force:
        return {"verdict": verdict, "promoted": False,
                "champion": str(champ.version) if champ is not None else None}
    who = None
    if not verdict.passed:
        try:
            who = getpass.getuser()
        except Exception:  # noqa: BLE001 - no user name in this environment
            who = "unknown"
    moved = apply_verdict(params, str(mv.version), verdict, mv.run_id, forced_by=who,
                          force_reason=reason)
    return {"verdict": verdict, "forced_by": who, **moved}


@task(name="promote", **task_options())
def promote_task(params: Params, registered: dict[str, Any]) -> dict[str, Any]:
    return run(params, registered)


__all__ = ["run", "promote_task", "promote_version", "apply_verdict", "record_verdict",
           "finish_promotion", "decide", "champion_comparison"]
