"""The whole pipeline on a real file, as a user runs it: `infrec run --input FILE` with the shipped
params.yaml, in a temporary git + DVC workspace (its own state dir, MLflow database and local DVC
remote; a temporary Prefect server), then the figures it recorded.

    .venv/bin/python -m bench.pipeline --input ../shared/data/ml-1m/interactions.parquet
    .venv/bin/python -m bench.pipeline --generate 150000,15000,30000000        # Netflix-shaped
    .venv/bin/python -m bench.pipeline --generate 52000,90000,3000000 --min-user-rows 3  # Amazon

``--generate USERS,ITEMS,ROWS`` writes a deterministic log first (:func:`bench.scale.write_csv`:
log-normal user activity, Zipf ``--zipf`` item popularity, ``--groups`` taste groups, ``--seed``)
into the temporary folder and runs on it; the JSON line then carries its shape as ``log``.

Progress goes to stderr; stdout has a table of the candidate families (validation and test
selection metric, seconds; which was registered and why) and the verdict, then, as its last line,
one JSON object::

    {"seconds": {"ingest": s, …, "promote": s, "total": s}, "peak_rss_mb": {"ingest": mb, …,
     "run": mb}, "candidate": {"val": {…}, "test": {…}, "test_ci95": {…}}, "sample": {…},
     "random": {"test": {…}}, "full": {"test": {…}}, "fidelity": f, "promoted": bool,
     "reasons": [...], "selection_metric": "ndcg@10", "distill": {...}, "loadavg": [...],
     "families": {name: {"val", "test", "seconds"}}, "registered": family, "why": "...",
     "fit_on": "full", "kernel": {...}, "kernel_search": [...], "weight": w}

``seconds.total`` is the wall time of the `infrec run` command (start-up, the temporary Prefect
server and MLflow included); the stage figures are what the flow measured around each task.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_API_URL", "MLFLOW_", "INFREC_"))}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _sh(cwd: Path, *args: str) -> None:
    subprocess.run(args, cwd=cwd, check=True, capture_output=True, env=_env())


def workspace(root: Path, params: Path) -> Path:
    """A git + DVC project with infrec's dvc.yaml, stage code and the given params."""
    ws = root / "ws"
    ws.mkdir()
    for name in ("models", "tasks"):
        shutil.copytree(REPO / name, ws / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, ws / name)
    shutil.copy(params, ws / "params.yaml")
    _sh(ws, "git", "init", "-q")
    _sh(ws, sys.executable, "-m", "dvc", "init", "-q")
    (ws / ".dvc" / "plots").mkdir(exist_ok=True)
    shutil.copy(REPO / ".dvc" / "plots" / "log_x.json", ws / ".dvc" / "plots" / "log_x.json")
    _sh(ws, "git", "add", "-A")
    _sh(ws, "git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit",
        "-qm", "bench workspace")
    return ws


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source_arg = ap.add_mutually_exclusive_group(required=True)
    source_arg.add_argument("--input", type=Path, help="interactions file")
    source_arg.add_argument("--generate", metavar="USERS,ITEMS,ROWS",
                            help="generate a log of this shape first (bench.scale.write_csv)")
    ap.add_argument("--zipf", type=float, default=0.9, help="item popularity exponent")
    ap.add_argument("--groups", type=int, default=50, help="taste groups")
    ap.add_argument("--min-user-rows", type=int, default=0, help="rows of the least active user")
    ap.add_argument("--seed", type=int, default=0, help="generator seed")
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml",
                    help="params file (default: the shipped params.yaml)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    args = ap.parse_args(argv)
    shape = None
    if args.generate:
        try:
            users, items, rows = (int(v) for v in args.generate.split(","))
        except ValueError:
            ap.error(f"--generate {args.generate!r}: expected USERS,ITEMS,ROWS (integers)")
    else:
        source = args.input.resolve()
        if not source.is_file():
            ap.error(f"{source}: no such file")
    root = Path(tempfile.mkdtemp(prefix="infrec-bench-pipeline-"))
    try:
        if args.generate:
            from bench.scale import write_csv

            source = root / "log.csv"
            t_gen = time.perf_counter()
            shape = write_csv(source, n_users=users, n_items=items, rows=rows, seed=args.seed,
                              groups=args.groups, zipf=args.zipf, min_user_rows=args.min_user_rows)
            sys.stderr.write(f"generated {shape} in {time.perf_counter() - t_gen:.1f}s\n")
        ws = workspace(root, args.params)
        load_start = os.getloadavg()
        t0 = time.perf_counter()
        proc = subprocess.run([str(Path(sys.executable).parent / "infrec"), "run", "--input",
                               str(source)], cwd=ws, env=_env(), stdout=subprocess.PIPE,
                              stderr=sys.stderr, text=True)
        total = time.perf_counter() - t0
        run_peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        sys.stderr.write(proc.stdout)
        if proc.returncode != 0:
            raise SystemExit(f"infrec run failed with exit code {proc.returncode}")
        evaluation = json.loads((ws / "reports" / "evaluation.json").read_text())
        distill = json.loads((ws / "reports" / "distill.json").read_text())
        status = json.loads(subprocess.run(
            [str(Path(sys.executable).parent / "infrec"), "status", "--json"], cwd=ws,
            env=_env(), capture_output=True, text=True, check=True).stdout)
        seconds = _seconds(proc.stdout)
        seconds["total"] = round(total, 1)
        peak = _line_figures(proc.stdout, "peak RSS MB (after each stage): ")
        peak["run"] = round(run_peak_mb, 1)
        last = status["last_run"]
        metric = evaluation["summary"]["metric"]
        result = {
            "seconds": seconds,
            "peak_rss_mb": peak,
            "log": shape,
            "candidate": {"val": evaluation["candidate"]["val"],
                          "test": evaluation["candidate"]["test"],
                          "test_ci95": evaluation["candidate"].get("test_ci95")},
            "sample": evaluation.get("sample"),
            "random": {"test": evaluation["random_users"]["test"]},
            "full": {"test": evaluation["reference"]["test"],
                     "description": evaluation["reference"]["description"]},
            "ease": {"test": evaluation["ease"]["test"],
                     "description": evaluation["ease"].get("description")},
            "fidelity": evaluation["summary"]["fidelity"],
            "promoted": bool(last and last["promoted"]),
            "reasons": last["reasons"] if last else [],
            "selection_metric": metric,
            "distill": {k: distill.get(k) for k in ("budget", "best_step", "steps_run", "lambda",
                                                    "coverage", "eval_users")},
            **candidate_families(evaluation, metric),
            "loadavg": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
        }
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            sys.stderr.write(f"workspace kept in {root}\n")
    print(families_table(result))
    print(json.dumps(result))
    return result


def candidate_families(evaluation: dict, metric: str) -> dict:
    """The fit stage's families (validation and test ``metric``, seconds), the one registered and
    why, what ∞-AE was fitted on and the NTK chosen on the summary."""
    cand = evaluation["candidate"]
    if not cand.get("family"):
        return {}
    rows = {name: {"val": block["val"][metric], "test": block["test"][metric],
                   "seconds": block.get("seconds")}
            for name, block in cand["families"].items()}
    rows["summary ∞-AE"] = {"val": cand["summary_model"]["val"][metric],
                            "test": cand["summary_model"]["test"][metric], "seconds": None}
    rows["EASE (gate a)"] = {"val": evaluation["ease"]["val"][metric],
                             "test": evaluation["ease"]["test"][metric], "seconds": None}
    return {"families": rows, "registered": cand["family"], "why": cand["selected_because"],
            "fit_on": cand["fit_on"], "kernel": cand.get("kernel"),
            "kernel_search": cand.get("kernel_search"), "weight": cand.get("weight")}


def families_table(result: dict) -> str:
    """A plain table of each family's figures and the verdict, printed before the JSON line."""
    metric = result["selection_metric"]
    lines = [f"{'family':<16} {'val ' + metric:>12} {'test ' + metric:>13} {'seconds':>8}"]
    for name, row in (result.get("families") or {}).items():
        sec = "-" if row["seconds"] is None else f"{row['seconds']:.1f}"
        mark = "  ← registered" if name == result.get("registered") else ""
        lines.append(f"{name:<16} {row['val']:>12.2f} {row['test']:>13.2f} {sec:>8}{mark}")
    if result.get("registered"):
        lines.append("(seconds: fit and validation of the family — the blend's on top of ∞-AE's; "
                     "test scoring of every family is one shared pass)")
        lines.append(f"registered: {result['why']}; ∞-AE fitted on {result['fit_on']}; "
                     f"kernel {result['kernel']}")
    lines.append(f"verdict: {'PROMOTED' if result['promoted'] else 'REJECTED'}"
                 + "".join(f"\n  {r}" for r in result["reasons"]))
    return "\n".join(lines)


def _seconds(stdout: str) -> dict[str, float]:
    """The ``seconds: ingest 1.0, distill …`` line `infrec run` prints."""
    return _line_figures(stdout, "seconds: ")


def _line_figures(stdout: str, prefix: str) -> dict[str, float]:
    """``{name: value}`` of the ``<prefix>name 1.0, name 2.0`` line `infrec run` prints."""
    line = next((ln for ln in stdout.splitlines() if ln.startswith(prefix)), None)
    out: dict[str, float] = {}
    for part in ([] if line is None else line[len(prefix):].split(", ")):
        name, value = part.rsplit(" ", 1)
        out[name] = float(value)
    return out


if __name__ == "__main__":
    main()
