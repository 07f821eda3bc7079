"""The served model beside the server's own floor, in one run: `mlflow models serve` on loopback
(started and stopped here) for a no-op model and for the model, the same ``--clients``
concurrent clients × ``--requests`` requests each (``--history`` items per request, drawn from
the model's own catalogue), ``--rounds`` times in turn (floor, model, floor, model, …), then
``--batches`` requests of ``--batch-size`` histories each to both.

    .venv/bin/python -m bench.serve_load            # after `make run`, from the project folder
    .venv/bin/python -m bench.serve_load --relog    # the champion's fit, this checkout's code

The floor is :mod:`bench.noop_model` — the served model's signature (so MLflow parses and checks
a request as for the model), a constant answer of ``k`` items — logged to a temporary registry.
The model is ``--model-uri`` (default ``models:/<registry.model_name>@champion`` of the tracking
URI infrec uses: ``MLFLOW_TRACKING_URI``, else ``tracking.uri``); a registered model serves the
code it was logged with, so ``--relog`` logs its fitted model directory again with this
checkout's ``models/`` and ``tasks/`` (:func:`tasks.register.log_pyfunc`, the same limits) into
the temporary registry and serves that. Both servers run at once (one idle while the other is
measured), with the same command line and environment. Each client keeps one HTTP/1.1
connection open; a request's latency is its round trip on loopback, its body encoded before.
``batch_ms`` is the round trip of one batch request with its body encoded before: the server's
time (parse, model, answer) plus loopback transfer.

Progress goes to stderr; the last stdout line is one JSON object::

    {"floor": {...}, "model": {...}, "ratio": {"rps", "p99", "batch_ms"}, "clients", "requests",
     "history", "k", "batch_size", "rounds", "model_uri", "relogged", "loadavg": [start, end]}

each side ``{"requests", "errors", "rps", "p50_ms", "p99_ms", "rounds": [{"rps", "p99_ms"}, …],
"batch_ms": [...], "batch_errors", "peak_rss_mb"}`` (``peak_rss_mb``: the server's process tree,
from /proc); ``ratio.rps`` = model rps / floor rps, ``ratio.p99`` = model p99 / floor p99,
``ratio.batch_ms`` = model / floor of the median batch.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from bench.common import free_port, say

REPO = Path(__file__).resolve().parents[1]


def _tree_hwm_mb(root_pid: int) -> float:
    """Sum of VmHWM over the process and its descendants (MB)."""
    children: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(pid))
    total, todo = 0.0, [root_pid]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


class Server:
    """`mlflow models serve -m URI --env-manager local` on a free loopback port."""

    def __init__(self, uri: str, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", uri,
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(self.port)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.logfile = log

    def wait(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.logfile.read_text()[-1500:]
                raise SystemExit(f"error: mlflow models serve did not start:\n{tail}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=2)
                return
            except OSError:
                time.sleep(0.5)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def _post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
    conn.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.read()


def _ok(status: int, data: bytes, rows: int, k: int) -> bool:
    if status != 200:
        return False
    try:
        preds = json.loads(data)["predictions"]
    except (ValueError, KeyError):
        return False
    return len(preds) == rows and all(len(p["items"]) == k for p in preds)


def load(port: int, work: list[list[bytes]], k: int) -> dict:
    """Each client (a thread, one kept-alive connection) sends its bodies one after another."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    start = threading.Barrier(len(work) + 1)

    def client(bodies: list[bytes]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        mine, bad = [], 0
        start.wait()
        for body in bodies:
            t0 = time.perf_counter()
            try:
                status, data = _post(conn, body)
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                status, data = 0, b""
            mine.append(time.perf_counter() - t0)
            bad += not _ok(status, data, 1, k)
        conn.close()
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    threads = [threading.Thread(target=client, args=(w,)) for w in work]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000
    return {"requests": len(latencies), "errors": errors[0], "wall_s": wall, "lat_ms": lat}


def summary(rounds: list[dict]) -> dict:
    lat = np.concatenate([r["lat_ms"] for r in rounds])
    wall = sum(r["wall_s"] for r in rounds)
    return {"requests": int(lat.size), "errors": int(sum(r["errors"] for r in rounds)),
            "rps": round(lat.size / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "rounds": [{"rps": round(r["requests"] / r["wall_s"], 1),
                        "p99_ms": round(float(np.percentile(r["lat_ms"], 99)), 1)}
                       for r in rounds]}


def _log_to(uri: str, log_model) -> str:
    """Log (in a run of experiment ``serve-load``) and register; the ``models:/`` URI."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=mlflow.create_experiment(
            f"serve-load-{time.time_ns()}", artifact_location=str(Path(uri[len("sqlite:///"):])
                                                                   .parent / "artifacts"))):
        info = log_model()
    return info.model_uri


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--model-uri", help="model to serve (default: models:/<name>@champion)")
    ap.add_argument("--relog", action="store_true",
                    help="serve the model's fit logged again with this checkout's code")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=40, help="requests per client and round")
    ap.add_argument("--rounds", type=int, default=2, help="floor/model load phases, in turn")
    ap.add_argument("--history", type=int, default=20, help="items per request")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1000)
    args = ap.parse_args(argv)

    import mlflow
    import pandas as pd
    import polars as pl

    from tasks import serving
    from tasks.params import load_params
    from tasks.register import log_pyfunc, serving_requirements

    params = load_params(args.params)
    uri, name = params.tracking_uri(), params.registry.model_name
    model_uri = args.model_uri or f"models:/{name}@champion"
    mlflow.set_tracking_uri(uri)
    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="infrec-serve-load-"))
    servers: list[Server] = []
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri,
                                                         dst_path=str(tmp / "model")))
        flavor = mlflow.models.Model.load(str(local)).flavors["python_function"]
        model_dir = local / flavor["artifacts"][serving.ARTIFACT_KEY]["path"]
        items = pl.read_parquet(model_dir / "item_map.parquet")["raw_id"].to_numpy()
        limits = dict(flavor.get("config") or {})
        bench_uri = f"sqlite:///{tmp / 'mlflow.db'}"
        floor_uri = _log_to(bench_uri, lambda: mlflow.pyfunc.log_model(
            name="model", python_model=str(REPO / "bench" / "noop_model.py"),
            signature=serving.signature(), pip_requirements=serving_requirements()))
        served_uri = model_uri
        if args.relog:
            example = pd.DataFrame({"history": [[int(x) for x in items[:5]]], "k": [10]})
            served_uri = _log_to(bench_uri, lambda: log_pyfunc(model_dir, limits or
                                                               params.serving.model_dump(), example))
        rng = np.random.default_rng(0)

        def history() -> list[int]:
            return [int(x) for x in rng.choice(items, size=min(args.history, len(items)),
                                               replace=False)]

        def body(rows: int) -> bytes:
            return json.dumps({"dataframe_records": [{"history": history(), "k": args.k}
                                                     for _ in range(rows)]}).encode()

        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        say(f"serving the floor (no-op) and {served_uri}"
            + (f" ({model_uri} logged with this checkout's code)" if args.relog else ""))
        floor = Server(floor_uri, {**env, "MLFLOW_TRACKING_URI": bench_uri}, tmp / "floor.log")
        servers.append(floor)
        model = Server(served_uri, {**env, "MLFLOW_TRACKING_URI": bench_uri if args.relog
                                    else uri}, tmp / "model.log")
        servers.append(model)
        floor.wait()
        model.wait()
        work = [[body(1) for _ in range(args.requests)] for _ in range(args.clients)]
        warm = [[body(1) for _ in range(2)] for _ in range(args.clients)]
        for side in (floor, model):
            load(side.port, warm, args.k)
        say(f"{args.clients} clients x {args.requests} requests, {args.history}-item histories, "
            f"k={args.k}, {args.rounds} rounds (load average {os.getloadavg()[0]:.2f})")
        results: dict[str, list[dict]] = {"floor": [], "model": []}
        for r in range(args.rounds):
            for label, side in (("floor", floor), ("model", model)):
                out = load(side.port, work, args.k)
                results[label].append(out)
                say(f"round {r + 1} {label}: {out['requests'] / out['wall_s']:.1f} req/s, p99 "
                    f"{np.percentile(out['lat_ms'], 99):.1f} ms, {out['errors']} errors")
        report: dict = {}
        batches = [body(args.batch_size) for _ in range(args.batches)]
        for label, side in (("floor", floor), ("model", model)):
            report[label] = summary(results[label])
            conn = http.client.HTTPConnection("127.0.0.1", side.port, timeout=600)
            times, bad = [], 0
            _post(conn, batches[0])  # first batch of this size: allocations
            for b in batches:
                t0 = time.perf_counter()
                status, data = _post(conn, b)
                times.append(round(1000 * (time.perf_counter() - t0), 1))
                bad += not _ok(status, data, args.batch_size, args.k)
            conn.close()
            say(f"{label}: batches of {args.batch_size} histories: {times} ms")
            report[label].update(batch_ms=times, batch_errors=bad,
                                 peak_rss_mb=round(_tree_hwm_mb(side.proc.pid), 1))
    finally:
        for side in servers:
            side.stop()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    f, m = report["floor"], report["model"]
    result = {
        "floor": f, "model": m,
        "ratio": {"rps": round(m["rps"] / f["rps"], 3), "p99": round(m["p99_ms"] / f["p99_ms"], 3),
                  "batch_ms": round(float(np.median(m["batch_ms"]) / np.median(f["batch_ms"])), 3)},
        "clients": args.clients, "requests": args.requests, "history": args.history, "k": args.k,
        "batch_size": args.batch_size, "rounds": args.rounds, "model_uri": model_uri,
        "relogged": args.relog,
        "loadavg": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
