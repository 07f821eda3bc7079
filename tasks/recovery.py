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

import functools
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Optional

from tasks import stop

from tasks.params import Params, redact
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


def _this_process(pid: Optional[str], host: Optional[str]) -> bool:
    return host == HOST and pid == str(os.getpid())


def stale_mlflow_runs(tracking_uri: str, experiment: str,
                      owner: Callable[[Optional[str], Optional[str]], bool] = _dead_here,
                      why: str = "killed: its process died") -> list[str]:
    """Mark RUNNING runs of dead infrec processes (``owner(pid, host)``) KILLED; their ids."""
    from tasks.registry import client

    cl = client(tracking_uri)
    exp = cl.get_experiment_by_name(experiment)
    if exp is None:
        return []
    marked = []
    for run in cl.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'",
                              max_results=1000):
        tags = run.data.tags
        if owner(tags.get("infrec.pid"), tags.get("infrec.host")):
            cl.set_tag(run.info.run_id, "infrec.recovered", why)
            cl.set_terminated(run.info.run_id, status="KILLED")
            marked.append(run.info.run_id)
    return marked


def incomplete_versions(tracking_uri: str, name: str,
                        owner: Callable[[Optional[str], Optional[str]], bool] = _dead_here,
                        why: str = "incomplete: its run died before the gates decided"
                        ) -> list[str]:
    """Tag versions registered but never decided (their run died) ``incomplete``."""
    from tasks import registry

    marked = []
    for mv in registry.model_versions(tracking_uri, name):
        tags = mv.tags or {}
        if tags.get(registry.STATE_TAG) != registry.REGISTERED:
            continue
        if not owner(tags.get("infrec.pid"), tags.get("infrec.host")):
            continue
        registry.set_version_tags(tracking_uri, name, str(mv.version), {
            registry.STATE_TAG: registry.INCOMPLETE, "infrec.recovered": why})
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


def close_own_records(params: Params) -> dict[str, list[str]]:
    """A run of this process was stopped (SIGTERM, Ctrl-C, a cancellation): its MLflow runs
    still open → ``KILLED``, its versions registered without a verdict → ``incomplete`` — what
    :func:`recover` does for a killed process, done before this one exits."""
    uri = params.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return {}
    why = "stopped: its run was interrupted (SIGTERM, SIGINT or a cancellation)"
    return {"mlflow_runs_killed": stale_mlflow_runs(uri, params.registry.experiment,
                                                    _this_process, why),
            "versions_incomplete": incomplete_versions(uri, params.registry.model_name,
                                                       _this_process, why)}


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


# -- a run told to stop (tasks/stop.py) -----------------------------------------------------
def cancellable(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a flow function whose first argument is the run's params: a stop ends it with a
    ``Cancelled`` state (its message says what was interrupted and whether anything was
    promoted); any exception raised after a stop was asked for is the stop's consequence (a
    child process killed by the same signal) and ends it the same way. A cancellation by a
    Prefect runner (``prefect flow-run cancel`` of a deployment's run) is handed back to
    Prefect's engine as its ``TerminationSignal`` after the same records are written."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        params = args[0] if args else next(iter(kwargs.values()), None)
        try:
            with stop.deferred("the pipeline"):
                result = fn(*args, **kwargs)
        except BaseException as exc:
            if not stop.requested() and not isinstance(exc, KeyboardInterrupt):
                _write_last_run(params, "failed", f"{type(exc).__name__}: {exc}")
                raise
            if not stop.requested():
                stop.request(signal.SIGINT)
            stopped = exc if isinstance(exc, stop.Interrupted) else stop.interrupted()
            with stop.finalizing():
                state = _cancelled_state(params, stopped)
            if _runner_cancel_intent():
                from prefect.exceptions import TerminationSignal

                raise TerminationSignal(signal.SIGTERM) from exc
            return state
        _write_last_run(params, "completed", getattr(result, "message", None) or "completed")
        return result

    return wrapper


def _runner_cancel_intent() -> bool:
    try:
        from prefect._internal.control_listener import get_intent

        return get_intent() == "cancel"
    except Exception:  # noqa: BLE001 - older Prefect: no control channel
        return False


def _api_alive() -> bool:
    try:
        import urllib.request

        from prefect.settings import get_current_settings

        url = get_current_settings().api.url
        if not url:
            return False
        with urllib.request.urlopen(f"{str(url).rstrip('/')}/health", timeout=2) as resp:
            return resp.status == 200
    except Exception:  # noqa: BLE001
        return False


def _flow_run() -> tuple[Optional[str], Optional[str]]:
    try:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        if ctx is not None and ctx.flow_run is not None:
            return str(ctx.flow_run.id), ctx.flow_run.name
    except Exception:  # noqa: BLE001
        pass
    return None, None


_BEFORE_REGISTRY = ("ingest", "distill", "fit", "evaluate", "version")


def _cancelled_state(params: Any, stopped: "stop.Interrupted") -> Any:
    """Write how the run ended everywhere (best effort, bounded) and return its Cancelled
    state."""
    from prefect.states import Cancelled

    flow_run_id, flow_run_name = _flow_run()
    # MLflow is written from the register stage on: an earlier stop need not wait for it
    where = stopped.where or ""
    registry_touched = (where.removeprefix("before ") not in (*_BEFORE_REGISTRY, "register")
                        if where.startswith("before ") else where not in _BEFORE_REGISTRY)
    promoted = registry_touched and _promoted_by(params, flow_run_id)
    message = (f"stopped by {stop.signal_name(stopped.signum)}"
               + (f" during {stopped.where}" if stopped.where else "")
               + ("; its candidate had already been promoted" if promoted
                  else "; nothing was promoted"))
    recorded = _api_alive()  # a dead API is not waited for: the next start marks it Crashed
    if recorded:
        if stopped.task_run_id:
            _cancel_task_run(stopped.task_run_id, message)
        if flow_run_id:
            tag_flow_run(flow_run_id, ["interrupted"])
    if registry_touched:
        _close_registry_records(params)
    _write_last_run(params, "interrupted", message, flow_run_id, flow_run_name,
                    prefect_recorded=recorded)
    try:
        say()(message)
    except Exception:  # noqa: BLE001 - logging to a dead API
        pass
    return Cancelled(message=message)


def _cancel_task_run(task_run_id: str, message: str) -> None:
    try:
        from uuid import UUID

        from prefect.client.orchestration import get_client
        from prefect.states import Cancelled

        with get_client(sync_client=True) as client:
            client.set_task_run_state(UUID(task_run_id), Cancelled(message=message), force=True)
    except Exception:  # noqa: BLE001 - the flow run's state still says it
        pass


def _promoted_by(params: Any, flow_run_id: Optional[str]) -> bool:
    """Whether the champion alias already points at this flow run's version (the commit point
    passed before the stop)."""
    if params is None or flow_run_id is None:
        return False
    uri = params.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return False  # no registry yet (and none created here)
    try:
        from tasks import registry

        mv = registry.alias_version(params.tracking_uri(), params.registry.model_name,
                                    registry.CHAMPION)
        return mv is not None and (mv.tags or {}).get("prefect_flow_run_id") == flow_run_id
    except Exception:  # noqa: BLE001 - no registry yet
        return False


def _close_registry_records(params: Any) -> None:
    """MLflow runs this process left open → KILLED; versions it registered without a verdict →
    incomplete (what the next start's recovery would do, done now)."""
    if params is None:
        return
    try:
        close_own_records(params)
    except Exception:  # noqa: BLE001 - the next start's recovery repeats it
        pass


def _write_last_run(params: Any, outcome: str, message: str, flow_run_id: Optional[str] = None,
                    flow_run_name: Optional[str] = None, prefect_recorded: bool = True) -> None:
    if params is None or not hasattr(params, "state_path"):
        return
    if flow_run_id is None:
        flow_run_id, flow_run_name = _flow_run()
    try:
        from tasks.io import write_json

        write_json(params.state_path() / LAST_RUN_FILE, {
            "outcome": outcome, "message": redact(message)[:2000], "flow_run_id": flow_run_id,
            "flow_run_name": flow_run_name, "prefect_recorded": prefect_recorded,
            "pid": os.getpid(),
            "ended": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    except Exception:  # noqa: BLE001 - a record, never a reason to fail
        pass


LAST_RUN_FILE = "last_run.json"


def last_run(state_dir: str | Path) -> Optional[dict[str, Any]]:
    """The record of the last pipeline run in ``state_dir`` (None when there is none)."""
    import json

    try:
        return json.loads((Path(state_dir) / LAST_RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


__all__ = ["cancellable", "last_run", "LAST_RUN_FILE", "recover", "close_own_records", "tag_flow_run", "stale_mlflow_runs",
           "incomplete_versions", "crashed_flow_runs"]
