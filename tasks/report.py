"""The run report: a markdown table of every model's metrics and each gate's verdict — published as
a Prefect artifact and printed (shorter) by ``infrec run``."""

from __future__ import annotations

from typing import Any

from prefect import task

from tasks.params import METRIC_KEYS
from tasks.runtime import say, task_options

REPORT_KEY = "infrec-pipeline-report"  # Prefect artifact keys: lowercase letters, digits, dashes


def _fmt(v: Any) -> str:
    return "–" if v is None else (f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}")


def outcome(result: dict[str, Any]) -> str:
    if result.get("unchanged"):
        return "UNCHANGED"
    return "PROMOTED" if result.get("promoted") else "REJECTED"


def failing_gates(result: dict[str, Any]) -> list[str]:
    verdict = result.get("verdict") or {}
    return [g["name"] for g in verdict.get("gates", []) if not g["passed"]]


def candidate_label(candidate: dict[str, Any]) -> str:
    """``candidate (blend, ∞-AE on all users)``; ``candidate (summary)`` for a report from before
    the families."""
    family = candidate.get("family")
    if not family:
        return "candidate (summary)"
    support = "∞-AE on all users" if candidate.get("fit_on") == "full" else "∞-AE on the summary"
    return f"candidate ({family}, {support})"


def report_markdown(result: dict[str, Any]) -> str:
    ev = result["evaluation"]
    cand = ev["candidate"]
    rows = [(candidate_label(cand), cand)]
    for family, block in (cand.get("families") or {}).items():
        if family != cand.get("family"):
            rows.append((f"family {family} (not registered)", block))
    if cand.get("summary_model") and cand.get("fit_on") != "summary":
        rows.append((cand["summary_model"]["description"], cand["summary_model"]))
    rows += [("PopRec", ev["poprec"]), ("EASE", ev["ease"]),
             (ev["reference"]["description"], ev["reference"])]
    if ev.get("random_users"):
        rows.append(("random users (same budget)", ev["random_users"]))
    lines = [
        f"# infrec pipeline — {result['model_name']} v{result['version']}: **{outcome(result)}**",
        "",
        f"MLflow run `{result.get('run_id') or '-'}` · data `{result['data_version']}` · "
        f"summary `{result['summary_hash']}` · selection metric `{result['metric']}`",
        "",
        "| model | split | " + " | ".join(METRIC_KEYS) + " |",
        "|---|---|" + "---|" * len(METRIC_KEYS),
    ]
    for name, block in rows:
        for split in ("val", "test"):
            vals = block.get(split) or {}
            lines.append(f"| {name} | {split} | "
                         + " | ".join(_fmt(vals.get(k)) for k in METRIC_KEYS) + " |")
    if cand.get("selected_because"):
        kernel = cand.get("kernel") or {}
        lines += ["", f"Registered family: {cand['selected_because']}. NTK chosen on the summary: "
                      f"depth {kernel.get('depth')}, σ_w² {kernel.get('w_var')}, σ_b² "
                      f"{kernel.get('b_var')}; ∞-AE fitted on {cand.get('fit_on')} "
                      f"(fit.on: {cand.get('fit_on_setting')})."]
    verdict = result.get("verdict")
    if verdict:
        lines += ["", "| gate | result | reason |", "|---|---|---|"]
        for g in verdict["gates"]:
            lines.append(f"| {g['name']} | {'pass' if g['passed'] else 'FAIL'} | {g['reason']} |")
    elif result.get("unchanged"):
        lines += ["", f"Data, summary, params and code equal {result.get('equals') or 'v' + str(result['version'])}"
                      ": nothing registered."]
    lines += ["", f"Champion: {'v' + result['champion'] if result.get('champion') else 'none'}"]
    return "\n".join(lines) + "\n"


@task(name="publish-report", **task_options(io=False))
def publish_report_task(result: dict[str, Any]) -> str:
    from prefect.artifacts import create_markdown_artifact

    markdown = report_markdown(result)
    create_markdown_artifact(key=REPORT_KEY, markdown=markdown,
                             description=f"infrec pipeline: {result['model_name']} "
                                         f"v{result['version']} {outcome(result)}")
    say()(f"report published as Prefect artifact '{REPORT_KEY}'")
    return markdown


__all__ = ["report_markdown", "candidate_label", "publish_report_task", "outcome", "failing_gates", "REPORT_KEY"]
