"""Crash safety: `infrec run` killed by SIGKILL at each of the pipeline's moments (ingest, distill,
DVC commit, DVC push, model logging, registration, alias moves), then a normal run — in a real
git + DVC workspace with a real local remote, MLflow on SQLite, a real Prefect server (and, for
the first moment, the temporary Prefect server `infrec run` starts by itself).

After every rerun: the rerun succeeded; no MLflow run is left RUNNING; no process the killed run
started is alive; no alias points at a version without a passing verdict; every `promoted` tag
agrees with the aliases; `dvc status` is clean; no temporary folder is left. Then a champion
whose logged arrays are truncated: reported, skipped by gate (b), replaced."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import make_workspace, prefect_server, write_log

pytestmark = pytest.mark.slow
MODEL = "infrec-infae"
MOMENTS = ("ingest", "distill", "dvc-commit", "dvc-push", "model-logging", "registration",
           "alias-move")


def _processes_under(root: Path) -> list[str]:
    """Processes (other than this one) whose working directory is inside ``root``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
        except OSError:
            continue
        if cwd == str(root) or cwd.startswith(str(root) + os.sep):
            found.append(f"{pid}: {cmd}")
    return found


def _inconsistencies(ws) -> list[str]:
    """Everything the registry, DVC and the state folder say that is not true."""
    client = ws.client()
    bad = []
    for run in client.search_runs(
            [e.experiment_id for e in client.search_experiments()], "attributes.status = 'RUNNING'"):
        bad.append(f"MLflow run {run.info.run_id} left RUNNING")
    aliases = ws.aliases()
    versions = {str(mv.version): dict(mv.tags)
                for mv in client.search_model_versions(f"name='{MODEL}'")}
    for alias in ("champion", "previous"):
        version = aliases.get(alias)
        if version is not None:
            tags = versions[version]
            if tags.get("infrec.state") != "decided" or (
                    tags.get("gate.passed") != "true" and "forced_by" not in tags):
                bad.append(f"{alias} on v{version} without a passing verdict: {tags}")
    promoted = sorted((int(v) for v, t in versions.items() if t.get("promoted") == "true"))
    champion = aliases.get("champion")
    if promoted and str(promoted[-1]) != champion:  # no rollback here: the last promoted leads
        bad.append(f"v{promoted[-1]} is the last tagged promoted but the champion is v{champion}")
    if champion is not None and versions[champion].get("promoted") != "true":
        bad.append(f"the champion v{champion} is not tagged promoted")
    if "up to date" not in ws.dvc("status").lower():
        bad.append("dvc status: " + ws.dvc("status"))
    state = ws.root / ".infrec"
    left = [str(p) for p in state.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name
            or p.name.startswith(".restore-")]
    bad.extend(f"left behind: {p}" for p in left)
    return bad


@pytest.fixture(scope="module")
def api_url(tmp_path_factory):
    with prefect_server(tmp_path_factory.mktemp("faults-prefect")) as url:
        yield url


def test_kill_9_at_every_moment_then_a_normal_run_recovers(tmp_path, api_url):
    log = write_log(tmp_path / "logs" / "ratings.csv", users=300)
    ws = make_workspace(tmp_path, None, ingest={"input": str(log)})
    ws.infrec("run")  # v1, champion (temporary Prefect server)
    table = []
    for n, moment in enumerate(MOMENTS):
        write_log(log, users=300, extra_rows=40 * (n + 1))  # new content: a new candidate
        ws.api_url = None if moment == "ingest" else api_url  # the first: a temporary server
        killed = ws.infrec("run", check=False, env=ws.env(INFREC_FAULT=moment))
        assert killed.returncode == -signal.SIGKILL, (moment, killed.stderr[-3000:])
        time.sleep(10 if moment == "ingest" else 1)  # what it started dies with it
        orphans = _processes_under(ws.root)
        rerun = ws.infrec("run", check=False)
        assert rerun.returncode == 0, (moment, rerun.stdout[-2000:], rerun.stderr[-3000:])
        bad = _inconsistencies(ws)
        table.append((moment, rerun.returncode == 0, len(bad), len(orphans)))
        assert not orphans, (moment, orphans)
        assert not bad, (moment, bad)
    print("fault / rerun ok / inconsistencies / orphans")
    for row in table:
        print(*row)
    _a_corrupt_champion_is_isolated(ws, log)


def _truncate_champion(ws) -> str:
    """Cut the champion's logged arrays in half (as a full disk or a bad copy would); its
    version."""
    mv = ws.client().get_model_version_by_alias(MODEL, "champion")
    model_id = mv.source.rsplit("/", 1)[-1]  # models:/m-<id>, MLflow's logged model
    stored = ws.root / ".infrec" / "mlartifacts" / "models" / model_id / "artifacts"
    arrays = sorted(stored.rglob("alpha.npy"))
    assert len(arrays) == 1, (mv.source, list(stored.rglob("*"))[:20])
    data = arrays[0].read_bytes()
    arrays[0].write_bytes(data[: len(data) // 2])
    return str(mv.version)


def _a_corrupt_champion_is_isolated(ws, log) -> None:
    """A champion whose artifacts cannot be loaded: `status` and `recommend` say so in one line,
    the next run skips gate (b) with that reason and replaces it, and `promote --force` can put
    a loadable version back."""
    broken = _truncate_champion(ws)
    status = ws.infrec("status")
    line = next(ln for ln in status.stdout.splitlines() if ln.startswith("champion:"))
    assert "UNUSABLE" in line and f"version {broken}" in line, status.stdout
    rec = ws.infrec("recommend", "--history", "1,2,3", "-k", "5", check=False)
    assert rec.returncode == 2 and "Traceback" not in rec.stderr, (rec.returncode, rec.stderr)
    assert len(rec.stderr.strip().splitlines()) == 1 and "cannot" in rec.stderr, rec.stderr
    write_log(log, users=300, extra_rows=40 * (len(MOMENTS) + 1))
    run = ws.infrec("run")
    assert f"skipped: champion v{broken} is unusable" in run.stdout, run.stdout[-3000:]
    assert "PROMOTED to champion" in run.stdout, run.stdout[-3000:]
    assert ws.aliases()["champion"] != broken
    assert "UNUSABLE" not in ws.infrec("status").stdout
    ws.infrec("recommend", "--history", "1,2,3", "-k", "5")
    # the new champion broken too: promote puts the previous good version back by hand
    now = _truncate_champion(ws)
    good = max((int(mv.version) for mv in ws.client().search_model_versions(f"name='{MODEL}'")
                if str(mv.version) not in (now, broken) and mv.tags.get("gate.passed") == "true"
                and mv.tags.get("infrec.state") == "decided"))
    back = ws.infrec("promote", str(good), "--force", "--reason", "champion corrupt")
    assert f"champion: {MODEL} version {good}" in back.stdout, back.stdout
    assert ws.aliases()["champion"] == str(good)
    ws.infrec("recommend", "--history", "1,2,3", "-k", "5")
    # (a newer version keeps its `promoted` tag: it was promoted; the champion is the one aliased)
    champion = ws.client().get_model_version_by_alias(MODEL, "champion")
    assert champion.tags.get("promoted") == "true" and champion.tags.get("infrec.state") == "decided"
    assert not [b for b in _inconsistencies(ws) if "last tagged promoted" not in b]
