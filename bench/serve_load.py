"""Load on the served champion: `mlflow models serve` on loopback (started and stopped here),
``--clients`` concurrent clients × ``--requests`` requests each (``--history`` items per
request, drawn from the model's own catalogue), then ``--batches`` batches of ``--batch-size``
histories in one request each.

    .venv/bin/python -m bench.serve_load            # after `make run`, from the project folder

The model is ``models:/<registry.model_name>@champion`` of the tracking URI infrec uses
(``MLFLOW_TRACKING_URI``, else ``tracking.uri``, else ``mlflow.db`` here). Progress goes to
stderr; the last stdout line is one JSON object::

    {"requests", "errors", "rps", "p50_ms", "p99_ms", "batch_ms", "peak_rss_mb"}

``peak_rss_mb`` is the server's (its process tree's) peak resident memory, read from /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from bench.common import free_port, post_json, say


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=40, help="requests per client")
    ap.add_argument("--history", type=int, default=20, help="items per request")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1000)
    args = ap.parse_args(argv)

    from tasks.params import load_params

    params = load_params(args.params)
    uri, name = params.tracking_uri(), params.registry.model_name
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion = client.get_model_version_by_alias(name, "champion")
    import polars as pl

    items = pl.read_parquet(params.paths().processed / "item_map.parquet")["raw_id"].to_numpy()
    rng = np.random.default_rng(0)

    def history() -> list[int]:
        return [int(x) for x in rng.choice(items, size=min(args.history, len(items)),
                                           replace=False)]

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    say(f"serving {name} v{champion.version} on 127.0.0.1:{port}")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
         f"models:/{name}@champion", "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/invocations"
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("error: mlflow models serve did not start")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        post_json(url, {"dataframe_records": [{"history": history(), "k": args.k}]})  # warm up

        work = [[history() for _ in range(args.requests)] for _ in range(args.clients)]
        latencies: list[float] = []
        errors = [0]
        lock = threading.Lock()

        def client_loop(mine: list[list[int]]) -> None:
            for h in mine:
                t0 = time.perf_counter()
                try:
                    out = post_json(url, {"dataframe_records": [{"history": h, "k": args.k}]})
                    ok = len(out["predictions"][0]["items"]) == args.k
                except Exception:  # noqa: BLE001 - counted
                    ok = False
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    errors[0] += not ok

        say(f"{args.clients} clients x {args.requests} requests, {args.history}-item histories")
        threads = [threading.Thread(target=client_loop, args=(w,)) for w in work]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0

        batch_ms = []
        for b in range(args.batches):
            records = [{"history": history(), "k": args.k} for _ in range(args.batch_size)]
            t1 = time.perf_counter()
            out = post_json(url, {"dataframe_records": records}, timeout=600)
            batch_ms.append(round(1000 * (time.perf_counter() - t1), 1))
            if len(out["predictions"]) != args.batch_size:
                errors[0] += 1
            say(f"batch {b + 1}: {args.batch_size} histories in {batch_ms[-1]} ms")
        peak = _tree_hwm_mb(server.pid)
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)
    lat = np.asarray(latencies) * 1000
    print(json.dumps({"requests": len(latencies), "errors": errors[0],
                      "rps": round(len(latencies) / wall, 1),
                      "p50_ms": round(float(np.percentile(lat, 50)), 1),
                      "p99_ms": round(float(np.percentile(lat, 99)), 1),
                      "batch_ms": batch_ms, "peak_rss_mb": round(peak, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
