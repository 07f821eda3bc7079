"""Sweeps as Prefect tasks on Dask (prefect-dask) give the sequential path's numbers.

A local Dask cluster of threads (``processes=False``): worker *processes* would each start their
own temporary Prefect server in the test harness's ephemeral mode (see flows/sweep.py). The
``address`` branch is exercised against a scheduler started here on a loopback TCP port.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

GRID = [0.0, 1.0, 5.0, 20.0, 50.0, 100.0]
TOL = dict(rel=1e-6, abs=1e-9)


@pytest.fixture(scope="module")
def data_dir(flow_env, tmp_path_factory):
    from tasks.ingest import ingest

    out = tmp_path_factory.mktemp("sweep") / "processed"
    ingest(flow_env.input_csv, out, seed=0)
    return out


def _assert_same_path(sweep_path, sequential_path):
    assert [p["lambda"] for p in sweep_path] == [r.lam for r in sequential_path]
    for point, ref in zip(sweep_path, sequential_path):
        assert point["lambda_scaled"] == pytest.approx(ref.lam_scaled, **TOL)
        assert point["val"].keys() == ref.val.keys()
        for key, value in ref.val.items():
            assert point["val"][key] == pytest.approx(value, **TOL), (point["lambda"], key)


def test_lambda_sweep_on_local_dask_matches_fit_select(data_dir):
    from flows.sweep import run_lambda_sweep
    from models.infinite_ae import fit_select
    from tasks.data import load_dataset
    from tasks.fit import choose_support

    result = run_lambda_sweep(data_dir, GRID, workers=2, processes=False,
                              select_metric="hr@100")

    dataset = load_dataset(data_dir)
    support, _, is_ctx = choose_support(dataset)
    model, path = fit_select(support, dataset.val_set(), GRID, support_is_val_context=is_ctx,
                             select_metric="hr@100")
    assert result["best_lambda"] == model.lam
    _assert_same_path(result["path"], path)
    best = next(r for r in path if r.lam == model.lam)
    assert result["best_val"] == pytest.approx(best.val, **TOL)
    assert result["support"]["kind"] == "all_users"


def test_user_sample_sweep_on_scheduler_address_matches_fit_select(data_dir):
    """The cross-kernel path (support ≠ validation users), on an existing scheduler by address."""
    from distributed import LocalCluster

    from flows.sweep import run_lambda_sweep
    from models.infinite_ae import fit_select
    from tasks.data import load_dataset
    from tasks.fit import choose_support

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp",
                      host="127.0.0.1", scheduler_port=0, dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        result = run_lambda_sweep(data_dir, GRID, address=cluster.scheduler_address,
                                  user_support=0.5, seed=3, select_metric="hr@100")

    dataset = load_dataset(data_dir)
    support, info, is_ctx = choose_support(dataset, user_support=0.5, seed=3)
    assert not is_ctx
    model, path = fit_select(support, dataset.val_set(), GRID, select_metric="hr@100")
    assert result["best_lambda"] == model.lam
    _assert_same_path(result["path"], path)
    assert result["support"] == info


def test_summary_sweep_matches_distill_dataset(data_dir, tmp_path):
    from flows.sweep import run_summary_sweep
    from tasks.distill import distill_dataset

    result = run_summary_sweep(data_dir, tmp_path / "sweep", "random", [40, 80], [0, 1],
                               workers=2, processes=False, select_metric="hr@100")
    points = {(p["budget"], p["seed"]): p for p in result["points"]}
    assert sorted(points) == [(40, 0), (40, 1), (80, 0), (80, 1)]
    for (budget, seed), point in points.items():
        ref = distill_dataset(data_dir, tmp_path / f"seq-{budget}-{seed}.parquet", sampler="random",
                              budget=budget, seed=seed)
        assert point["lambda"] == ref["lambda"]
        assert point["val"] == pytest.approx(ref["val"], **TOL)
    by_budget = {b["budget"]: b for b in result["by_budget"]}
    for budget in (40, 80):
        values = [points[(budget, s)]["val"]["hr@100"] for s in (0, 1)]
        assert by_budget[budget]["mean"] == pytest.approx(sum(values) / 2)
    best = max(result["points"], key=lambda p: p["val"]["hr@100"])
    assert result["best"]["val"]["hr@100"] == best["val"]["hr@100"]


def test_sweep_cli(data_dir, restore_environ):
    from typer.testing import CliRunner

    from infrec.cli import app
    from models.infinite_ae import fit_select
    from tasks.data import load_dataset
    from tasks.fit import choose_support

    res = CliRunner().invoke(app, ["sweep", "--data", str(data_dir), "--lambdas", "1,5,50",
                                   "--workers", "2", "--threads"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    dataset = load_dataset(data_dir)
    support, _, is_ctx = choose_support(dataset)
    model, path = fit_select(support, dataset.val_set(), [1, 5, 50], support_is_val_context=is_ctx,
                             select_metric="hr@100")
    assert out["best_lambda"] == model.lam
    _assert_same_path(out["path"], path)

    bad = CliRunner().invoke(app, ["sweep", "--data", str(data_dir / "nope")])
    assert bad.exit_code == 2 and "not a data directory" in bad.stderr
