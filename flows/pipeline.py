"""The end-to-end pipeline: ingest → distill → fit → evaluate → version → register → promote.

First an unchanged check (:func:`tasks.register.unchanged_before_ingest`): when the input's
content, the data and summary on disk, the params and the code equal a registered version's, no
stage runs and the flow ends ``unchanged`` in seconds.

Wiring only: every step is a stage's task (``tasks/<stage>.py``), the same ``run(params)`` that
``infrec <stage> --params`` and dvc.yaml's stage commands call. ``params`` is parsed once by the
entry point and resolved (absolute paths). The whole body holds the writer lock of the state dir
(:func:`tasks.concurrency.writer_lock`): runs, rollbacks and promotions never interleave.

A rejected candidate ends the flow run in a state named ``Rejected`` (of type COMPLETED: the run
itself worked) with a message naming the failing gates and the tag ``rejected``; otherwise
``Completed`` with the tag ``promoted`` or ``unchanged``.
"""

from __future__ import annotations

import resource
import time
from typing import Any

from prefect import flow
from prefect.runtime import flow_run
from prefect.states import Completed

from tasks import stop
from tasks.concurrency import writer_lock
from tasks.distill import distill_task
from tasks.evaluate import evaluate_task
from tasks.fit import fit_task
from tasks.ingest import ingest_task, point_log
from tasks.params import Params
from tasks.promote import promote_task
from tasks.recovery import cancellable, recover, tag_flow_run
from tasks.register import register_task, unchanged_task
from tasks.registry import git_commit
from tasks.report import failing_gates, outcome, publish_report_task
from tasks.runtime import flow_run_tag
from tasks.version import version_task


@flow(name="infrec-pipeline", log_prints=False)
@cancellable
def pipeline(params: Params):
    flow_run_id = str(flow_run.id or "local")
    tag_flow_run(flow_run_id, [flow_run_tag()])  # so that a crash is recognised at the next start
    lineage: dict[str, Any] = {"flow_run_id": flow_run_id, "git_commit": git_commit()}
    seconds: dict[str, float] = {}
    peak_rss: dict[str, float] = {}  # the process's peak resident set so far, after each stage

    def timed(name: str, fn, *args):
        stop.check_before(name)
        t0 = time.perf_counter()
        out = fn(*args)
        seconds[name] = round(time.perf_counter() - t0, 3)
        peak_rss[name] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        return out

    with writer_lock(params):
        recover(params)
        point_log(params)  # dvc.yaml's ingest dep: the file this run reads
        # the input's content, data, summary, params and code equal a registered version's: no
        # stage runs and nothing is registered (seconds, not minutes)
        result = timed("unchanged-check", unchanged_task, params, lineage)
        if result is None:
            data = timed("ingest", ingest_task, params)
            summary = timed("distill", distill_task, params)
            fitted = timed("fit", fit_task, params)
            evaluation = timed("evaluate", evaluate_task, params)
            version = timed("version", version_task, params, {**lineage, "input": data["input"]})
            lineage.update(input=data["input"], version=version, seconds=dict(seconds))
            registered = timed("register", register_task, params, lineage)
            promoted = timed("promote", promote_task, params, registered)
            result = {
                "model_name": registered["model_name"], "version": registered["version"],
                "run_id": registered["run_id"],
                "data_version": version["version"] if version else data["data_version"],
                "summary_hash": summary["summary_hash"], "metric": params.selection.metric,
                "candidate": {k: fitted[k] for k in ("lambda", "val", "test")},
                "evaluation": evaluation, "input": data["input"],
                "distill": summary["report"], **promoted,
            }

    result = {**result, "flow_run_id": flow_run_id, "seconds": seconds, "peak_rss_mb": peak_rss}
    publish_report_task(result)
    state = outcome(result).lower()
    tag_flow_run(flow_run_id, [state])
    failing = failing_gates(result)
    message = (f"{state}: {result['model_name']} v{result['version']}"
               + (f"; failing gates: {', '.join(failing)}" if failing else ""))
    # the verdict is the first thing the Prefect UI shows: a rejected run is not a green "Completed"
    return Completed(name="Rejected" if state == "rejected" else "Completed", message=message,
                     data=result)


def run_pipeline(params: Params) -> dict[str, Any]:
    """Entry for the CLI and tests: run the flow on resolved params, return its result."""
    return pipeline(params.resolved())


__all__ = ["pipeline", "run_pipeline"]
