"""Helpers for the tests that drive infrec the way a user does: its CLI in subprocesses, inside a
real temporary git + DVC workspace with a real local DVC remote, against a real Prefect server,
MLflow on SQLite in the workspace. Everything runs on loopback and is stopped afterwards."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# small, fast, lenient: a random-users summary; the gate thresholds are tested on hand-made
# numbers in tests/tasks/test_gates.py
SMALL: dict[str, Any] = {
    "generate": {"users": 300, "items": 120, "seed": 0},
    "distill": {"sampler": "random", "budget": 60, "seed": 0, "steps": 0, "samples": 8},
    "fit": {"summary_lambdas": [0.1, 1.0, 5.0, 50.0]},
    "evaluate": {"ease_lambdas": [10.0, 100.0]},
    "gates": {"pop_margin": -100.0, "ease_fraction": 0.0, "champion_epsilon": 100.0,
              "fidelity_fraction": 0.0},
    "versioning": {"enabled": True, "workspace": "."},
}
STRICT_GATES = {"fidelity_fraction": 2.0}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_json(url: str, payload: Any, timeout: float = 30) -> Any:
    """POST ``payload`` as JSON to ``url``; the decoded JSON answer (raises on HTTP errors)."""
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def stop_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """Terminate the process group ``proc`` leads (started with ``start_new_session``: a CLI and
    the servers it started), wait ``grace`` s, then kill it."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:  # the whole group is gone already
        proc.wait()
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=grace)


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without the test session's PREFECT_*/MLFLOW_*/INFREC_*, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "INFREC_"))}
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    env.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TF_CPP_MIN_LOG_LEVEL": "3",
                "DVC_NO_ANALYTICS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})
    env.update(extra)
    return env


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


@contextmanager
def prefect_server(root: Path, ui: bool = False, timeout: float = 150) -> Iterator[str]:
    """``infrec server`` on a free loopback port (its own PREFECT_HOME): yields the API URL."""
    from infrec.common import stop_process, wait_healthy

    port = free_port()
    home = root / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}/api"
    log = root / "prefect-server.log"
    env = clean_env(PREFECT_HOME=str(home))
    with log.open("w") as fh:
        proc = subprocess.Popen([str(BIN / "infrec"), "server", "--port", str(port),
                                 *([] if ui else ["--no-ui"])], env=env, cwd=root, stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        try:
            wait_healthy(url, timeout, process=proc)
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"{exc}\n{tail(log)}") from None
        yield url
    finally:
        stop_process(proc)


def project_params(**sections: dict[str, Any]) -> dict[str, Any]:
    """The project's params.yaml with SMALL, then ``sections``, merged in key by key."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for layer in (SMALL, sections):
        for name, values in layer.items():
            raw[name] = ({**(raw.get(name) or {}), **values} if isinstance(values, dict)
                         else values)
    return raw


def sh(cwd: Path, *args: str, env: Optional[dict[str, str]] = None, check: bool = True) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    if check:
        assert proc.returncode == 0, f"{args}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


class Workspace:
    """A git + DVC project holding infrec's dvc.yaml, stage code and a params.yaml."""

    def __init__(self, root: Path, remote: Path, api_url: Optional[str] = None):
        self.root, self.remote, self.api_url = root, remote, api_url

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def env(self, **extra: str) -> dict[str, str]:
        more = {"PREFECT_API_URL": self.api_url} if self.api_url else {}
        return clean_env(**more, **extra)

    def write_params(self, name: str = "params.yaml", **sections: dict[str, Any]) -> Path:
        path = self.root / name
        path.write_text(yaml.safe_dump(project_params(**sections), sort_keys=False))
        return path

    def infrec(self, *args: str, check: bool = True, timeout: float = 600,
               env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(BIN / "infrec"), *args], cwd=self.root, capture_output=True,
                              text=True, env=env or self.env(), timeout=timeout)
        if check:
            assert proc.returncode == 0, (f"infrec {' '.join(args)} → {proc.returncode}\n"
                                          f"{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}")
        return proc

    def dvc(self, *args: str, check: bool = True) -> str:
        return sh(self.root, sys.executable, "-m", "dvc", *args, env=self.env(), check=check)

    def git(self, *args: str) -> str:
        return sh(self.root, "git", *args)

    def client(self):
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def aliases(self, model: str = "infrec-infae") -> dict[str, str]:
        out = {}
        for alias in ("champion", "previous", "challenger"):
            try:
                out[alias] = str(self.client().get_model_version_by_alias(model, alias).version)
            except Exception:  # noqa: BLE001 - not set
                pass
        return out

    def version_tags(self, version: str, model: str = "infrec-infae") -> dict[str, str]:
        return dict(self.client().get_model_version(model, version).tags)

    def tree(self, rel: str) -> dict[str, bytes]:
        """``{relative path: bytes}`` of a file or folder of the workspace."""
        base = self.root / rel
        if base.is_file():
            return {rel: base.read_bytes()}
        return {str(p.relative_to(self.root)): p.read_bytes()
                for p in sorted(base.rglob("*")) if p.is_file()}


def make_workspace(root: Path, api_url: Optional[str] = None, committed_lock: bool = False,
                   **sections: dict[str, Any]) -> Workspace:
    """A fresh project: infrec's dvc.yaml, plot template and stage code, a params.yaml
    (SMALL + ``sections``), ``git init`` + ``dvc init`` + a real local remote, one commit.
    ``committed_lock``: the project's committed dvc.lock too, as a clone has it."""
    ws_root = root / "ws"
    ws_root.mkdir(parents=True)
    for name in ("models", "tasks"):
        shutil.copytree(REPO / name, ws_root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", ws_root / "dvc.yaml")
    if committed_lock:
        shutil.copy(REPO / "dvc.lock", ws_root / "dvc.lock")
    shutil.copy(REPO / ".gitignore", ws_root / ".gitignore")
    ws = Workspace(ws_root, root / "dvc-remote", api_url)
    ws.write_params(**sections)
    ws.git("init", "-q", "-b", "main")
    ws.dvc("init", "-q")
    (ws_root / ".dvc" / "plots").mkdir(exist_ok=True)
    shutil.copy(REPO / ".dvc" / "plots" / "log_x.json", ws_root / ".dvc" / "plots" / "log_x.json")
    ws.dvc("remote", "add", "-d", "store", str(ws.remote))
    ws.git("add", "-A")
    ws.git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "workspace")
    return ws


def clone_workspace(root: Path, api_url: Optional[str] = None,
                    **sections: dict[str, Any]) -> Workspace:
    """The project as a new user gets it with ``git clone --no-tags --single-branch`` of this
    checkout's HEAD (its committed dvc.yaml, dvc.lock, reports and code; no tags, no other
    branch), a params.yaml of SMALL + ``sections`` (the user's edit, uncommitted) and a real
    local DVC remote (``dvc remote add --local -d``: nothing committed changes)."""
    ws_root = root / "ws"
    sh(REPO, "git", "clone", "-q", "--no-tags", "--single-branch", str(REPO), str(ws_root))
    assert sh(ws_root, "git", "for-each-ref", "refs/tags", "refs/heads/infrec") == ""
    ws = Workspace(ws_root, root / "dvc-remote", api_url)
    ws.write_params(**sections)
    ws.dvc("remote", "add", "--local", "-d", "store", str(ws.remote))
    return ws


def write_log(path: Path, users: int, items: int = 120, seed: int = 0,
              extra_rows: int = 0, item_offset: int = 0) -> Path:
    """A user's interaction log: CSV ``userId,movieId,rating,timestamp`` (MovieLens-style
    names), deterministic; ``extra_rows`` appends new interactions (a growing daily log);
    ``item_offset`` is added to every item id (another catalogue)."""
    import numpy as np

    from tasks.synthetic import generate_interactions

    df = generate_interactions(n_users=users, n_items=items, seed=seed)
    rows = [(int(u), int(i), 4.0, int(t)) for u, i, t in zip(df["user_id"], df["item_id"],
                                                             df["timestamp"])]
    rng = np.random.default_rng(seed + 99)
    known = {(u, i) for u, i, _, _ in rows}
    item_ids = sorted({i for _, i, _, _ in rows})
    user_ids = sorted({u for u, _, _, _ in rows})
    while extra_rows > 0:
        u, i = int(rng.choice(user_ids)), int(rng.choice(item_ids))
        if (u, i) not in known:
            known.add((u, i))
            rows.append((u, i, 5.0, 1_100_000_000 + extra_rows))
            extra_rows -= 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("userId,movieId,rating,timestamp\n"
                    + "".join(f"{u},{i + item_offset},{r},{t}\n" for u, i, r, t in rows))
    return path


def last_json(proc: subprocess.CompletedProcess) -> Any:
    return json.loads(proc.stdout.strip().splitlines()[-1])


__all__ = ["REPO", "BIN", "SMALL", "STRICT_GATES", "Workspace", "make_workspace",
           "clone_workspace", "write_log",
           "prefect_server", "clean_env", "free_port", "tail", "sh", "last_json"]
