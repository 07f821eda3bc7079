"""One code path per stage: `infrec run` (the Prefect pipeline) and `dvc repro --force` (dvc.yaml's
`infrec <stage> --params params.yaml` commands) compute the same processed data, summary and
model (the same DVC hashes) and the same metrics — at fit.depth 1 and 2, the gate-(c) reference
included. Both are run as a user runs them, in a real git + DVC workspace."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from tasks.params import set_in_file
from tests.helpers import make_workspace, prefect_server

pytestmark = pytest.mark.slow


def _outs(ws) -> dict[str, str]:
    lock = yaml.safe_load((ws.root / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for st in lock["stages"].values() for o in st.get("outs", [])}


def _metrics(ws) -> dict[str, float]:
    flat: dict[str, float] = {}

    def walk(prefix: str, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
            flat[prefix[:-1]] = float(obj)

    for name in ("metrics.json", "evaluation.json", "distill.json"):
        walk(f"{name}:", json.loads((ws.root / "reports" / name).read_text()))
    return flat


def _close(a: dict[str, float], b: dict[str, float]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not math.isclose(a[k], b[k], rel_tol=1e-6, abs_tol=1e-6)]


def test_infrec_run_and_dvc_repro_compute_the_same_thing(tmp_path):
    with prefect_server(tmp_path) as api_url:
        ws = make_workspace(tmp_path, api_url,
                            distill={"sampler": "distill-cf", "budget": 40, "steps": 4,
                                     "samples": 8, "eval_every": 2})
        for depth in (1, 2):
            if depth == 2:
                set_in_file(ws.root / "params.yaml", "fit.depth", 2)
            ws.infrec("run")
            pipeline_outs, pipeline_metrics = _outs(ws), _metrics(ws)
            if depth == 1:
                ws.dvc("repro", "--force")  # every stage, each in its own `infrec <stage>`
            else:  # fit and evaluate at depth 2 (distill reads fit.depth too: compared at depth 1)
                ws.dvc("repro", "--force", "--single-item", "fit")
                ws.dvc("repro", "--force", "--single-item", "evaluate")
            repro_outs, repro_metrics = _outs(ws), _metrics(ws)
            assert pipeline_outs == repro_outs, depth  # data, summary, model: same DVC hashes
            assert not _close(pipeline_metrics, repro_metrics), depth
            assert "evaluation.json:reference.test.ndcg@10" in repro_metrics
            assert "up to date" in ws.dvc("status").lower()
        lock = yaml.safe_load((ws.root / "dvc.lock").read_text())
        assert lock["stages"]["fit"]["params"]["params.yaml"]["fit.depth"] == 2
        assert lock["stages"]["evaluate"]["params"]["params.yaml"]["fit.depth"] == 2
