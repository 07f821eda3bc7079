"""Crash recovery: what a ``kill -9`` can leave behind is found and marked at the next start.

Every writer (``infrec run``, ``rollback``, ``promote``) calls :func:`recover` right after it has
taken the writer lock — so no live writer of the same state dir can be mid-way — and:

* MLflow runs left ``RUNNING`` by a dead process (tag ``infrec.pid`` on this host) → ``KILLED``;
* model versions registered but never decided (``infrec.state=registered``) → ``incomplete``
  (never eligible for ``champion``; ``infrec promote --force`` can still take one);
* Prefect flow runs of ``infrec-pipeline`` left ``Running`` by a dead process (flow-run tag
  ``pid-<pid>-<host>``) → ``Crashed``;
* leftover temporary folders of interrupted writers (``.NAME.tmp-*``, ``.infrec-restore-*``)
  are removed, and an interrupted rollback is finished or undone (:mod:`tasks.rollback`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

from tasks.params import Params
from tasks.runtime import HOST, say


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_here(pid: Optional[str], host: Optional[str]) -> bool:
    if not pid or host != HOST:
        return False
    try:
        return not _alive(int(pid))
    except ValueError:
        return False


def stale_mlflow_runs(tracking_uri: str, experiment: str) -> list[str]:
    """Mark RUNNING runs of dead infrec processes KILLED; returns their ids."""
    from tasks.registry import client

    cl = client(tracking_uri)
    exp = cl.get_experiment_by_name(experiment)
    if exp is None:
        return []
    marked = []
    for run in cl.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'",
                              max_results=1000):
        tags = run.data.tags
        if _dead_here(tags.get("infrec.pid"), tags.get("infrec.host")):
            cl.set_tag(run.info.run_id, "infrec.recovered", "killed: its process died")
            cl.set_terminated(run.info.run_id, status="KILLED")
            marked.append(run.info.run_id)
    return marked


def incomplete_versions(tracking_uri: str, name: str) -> list[str]:
    """Tag versions registered but never decided (their run died) ``incomplete``."""
    from tasks import registry

    marked = []
    for mv in registry.model_versions(tracking_uri, name):
        tags = mv.tags or {}
        if tags.get(registry.STATE_TAG) != registry.REGISTERED:
            continue
        if not _dead_here(tags.get("infrec.pid"), tags.get("infrec.host")):
            continue
        registry.set_version_tags(tracking_uri, name, str(mv.version), {
            registry.STATE_TAG: registry.INCOMPLETE,
            "infrec.recovered": "incomplete: its run died before the gates decided"})
        if any(a == registry.CHAMPION for a in (mv.aliases or [])):  # never the case by design
            registry.set_alias(tracking_uri, name, registry.CHAMPION, None)
        marked.append(str(mv.version))
    return marked


def crashed_flow_runs() -> list[str]:
    """Set ``Crashed`` on Running/Pending pipeline flow runs whose process died (this host)."""
    try:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterState,
                                                    FlowRunFilterStateType)
        from prefect.client.schemas.objects import StateType
        from prefect.states import Crashed
    except ImportError:  # pragma: no cover
        return []
    marked = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING]))))
        for fr in runs:
            for tag in fr.tags or []:
                if not tag.startswith("pid-"):
                    continue
                _, pid, host = tag.split("-", 2)
                if _dead_here(pid, host):
                    client.set_flow_run_state(fr.id, Crashed(message="its process was killed "
                                                              "(found at the next start)"),
                                              force=True)
                    marked.append(str(fr.id))
    return marked


def tag_flow_run(flow_run_id: str, tags: list[str]) -> None:
    """Add tags to a flow run (best effort: the run's outcome is already recorded elsewhere)."""
    try:
        from uuid import UUID

        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            fr = client.read_flow_run(UUID(flow_run_id))
            client.update_flow_run(fr.id, tags=sorted(set(fr.tags or []) | set(tags)))
    except Exception:  # noqa: BLE001 - e.g. "local" ids outside Prefect
        pass


def recover(params: Params, log: Optional[Callable[[str], None]] = None,
            prefect: bool = True) -> dict[str, Any]:
    """Find and mark what crashed writers left (see the module docstring). Call it holding the
    writer lock."""
    from tasks.io import sweep_temporaries

    log = log or say()
    found: dict[str, Any] = {}
    state = params.state_path()
    removed = []
    for folder in (state, state / "data", params.reports_path(), params.reports_path() / "plots",
                   Path(params.versioning.workspace).resolve()):
        removed += [str(p) for p in sweep_temporaries(folder)]
    if removed:
        found["temporaries"] = removed
    try:
        from tasks.rollback import recover_interrupted

        restored = recover_interrupted(params)
        if restored:
            found["rollback"] = restored
    except ImportError:  # pragma: no cover
        pass
    uri = params.tracking_uri()
    if not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///"):]).is_file():
        killed = stale_mlflow_runs(uri, params.registry.experiment)
        if killed:
            found["mlflow_runs_killed"] = killed
        incomplete = incomplete_versions(uri, params.registry.model_name)
        if incomplete:
            found["versions_incomplete"] = incomplete
    if prefect:
        crashed = crashed_flow_runs()
        if crashed:
            found["flow_runs_crashed"] = crashed
    for key, value in found.items():
        log(f"recovered after a crash: {key.replace('_', ' ')}: {', '.join(map(str, value))}")
    return found


__all__ = ["recover", "tag_flow_run", "stale_mlflow_runs",
           "incomplete_versions", "crashed_flow_runs"]
