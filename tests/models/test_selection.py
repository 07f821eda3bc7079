"""One selection metric: ∞-AE's λ, EASE's λ, Distill-CF's λ, best step and early stop all follow it.

The cases are built so that two metrics disagree (HR@100 is nearly saturated on a small catalogue
while nDCG@10 is not): each selector must then pick differently when only the metric changes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from models.baselines import fit_ease_select
from models.distill_cf import DistillConfig, distill
from models.infinite_ae import EvalSet, check_select_metric, fit_select
from models.metrics import METRIC_KEYS, sample_negatives
from models.samplers import rows_of
from tests.models.test_distill_cf import low_rank_data


def taste_data(n_users: int, n_items: int, rank: int = 4, seed: int = 0):
    """Binary users × items from low-rank tastes plus popularity; 20% of each row held out,
    with AUC negatives."""
    train, val = low_rank_data(n_users, n_items, rank, seed)
    negatives = sample_negatives(train + val.targets, 20, seed=0)
    return train, dataclasses.replace(val, negatives=negatives)


def first_argmax(values) -> int:
    values = list(values)
    return values.index(max(values))


GRID = [1e-3, 0.1, 1.0, 5.0, 50.0, 500.0]


@pytest.fixture(scope="module")
def infae_case():
    return taste_data(300, 300, seed=1)


@pytest.mark.parametrize("metric", METRIC_KEYS)
def test_fit_select_keeps_the_best_lambda_of_any_metric(infae_case, metric):
    train, val = infae_case
    model, path = fit_select(train, val, GRID, support_is_val_context=True, select_metric=metric)
    assert model.lam == GRID[first_argmax(p.val[metric] for p in path)]
    # the same choice when only the selection metric is ranked for the λ not kept
    fast, fast_path = fit_select(train, val, GRID, support_is_val_context=True,
                                 select_metric=metric, path_metrics=(metric,))
    assert fast.lam == model.lam
    assert [p.val[metric] for p in fast_path] == pytest.approx([p.val[metric] for p in path])
    kept = next(p for p in fast_path if p.lam == fast.lam)
    assert set(kept.val) == set(METRIC_KEYS)  # the kept λ gets every metric


def test_fit_select_metrics_disagree_and_the_choice_follows(infae_case):
    train, val = infae_case
    by_hr, path = fit_select(train, val, GRID, support_is_val_context=True, select_metric="hr@100")
    by_ndcg, _ = fit_select(train, val, GRID, support_is_val_context=True, select_metric="ndcg@10")
    assert by_hr.lam != by_ndcg.lam
    hr = {p.lam: p.val["hr@100"] for p in path}
    ndcg = {p.lam: p.val["ndcg@10"] for p in path}
    assert hr[by_hr.lam] > hr[by_ndcg.lam] and ndcg[by_ndcg.lam] > ndcg[by_hr.lam]
    # the explicit-kernel route (support ≠ validation context) chooses the same way
    slow, _ = fit_select(train, val, GRID, support_is_val_context=False, select_metric="ndcg@10")
    assert slow.lam == by_ndcg.lam


def test_fit_ease_select_follows_the_metric():
    train, val = taste_data(300, 120, seed=1)
    grid = [1.0, 10.0, 100.0, 1000.0, 10000.0]
    chosen = {}
    for metric in METRIC_KEYS:
        model, path = fit_ease_select(train, val, grid, select_metric=metric)
        assert model.lam == grid[first_argmax(p["val"][metric] for p in path)]
        chosen[metric] = model.lam
    assert chosen["hr@100"] != chosen["ndcg@10"]


def test_unknown_metric_is_rejected(infae_case):
    train, val = infae_case
    with pytest.raises(ValueError, match="selection metric"):
        fit_select(train, val, GRID, select_metric="ndcg@5")
    with pytest.raises(ValueError, match="selection metric"):
        fit_ease_select(train, val, [1.0], select_metric="NDCG@10")
    with pytest.raises(ValueError, match="selection metric"):
        DistillConfig(select_metric="map@10")
    no_negatives = EvalSet(context=val.context, targets=val.targets, weights=val.weights)
    with pytest.raises(ValueError, match="negatives"):
        check_select_metric("auc", no_negatives)
    assert check_select_metric("psp@100") == "psp@100"


# -- Distill-CF ----------------------------------------------------------------------------------
FAST = dict(budget=20, samples=50, max_steps=40, eval_steps=(), eval_every=10, patience=100,
            seed=3)


@pytest.fixture(scope="module")
def distill_case():
    return taste_data(400, 300, seed=0)


def _evaluations(result):
    return [h for h in result.history if h["evaluated"]]


@pytest.fixture(scope="module")
def runs(distill_case):
    train, val = distill_case
    return {metric: distill(train, val, DistillConfig(**FAST, select_metric=metric))
            for metric in ("hr@100", "ndcg@10")}


@pytest.mark.parametrize("metric", ["hr@100", "ndcg@10"])
def test_distill_every_choice_follows_the_metric(runs, metric):
    result = runs[metric]
    evaluations = _evaluations(result)
    assert [h["step"] for h in evaluations] == [0, 10, 20, 30, 40]
    for h in evaluations:
        # each evaluation's λ is the grid's best by the selection metric, and is what is reported
        lams, values = zip(*h["lambda_path"])
        assert list(lams) == list(DistillConfig().lambdas)
        assert h["lambda"] == lams[first_argmax(values)]
        assert h[f"val_{metric}"] == pytest.approx(max(values))
        assert h["val"][metric] == pytest.approx(max(values))
        assert h["select_metric"] == metric
    best = evaluations[first_argmax(h["val"][metric] for h in evaluations)]
    assert result.best_step == best["step"]
    assert result.best_lambda == best["lambda"]
    assert result.best_val == best["val"]
    assert result.init_val == evaluations[0]["val"]
    assert result.history[-1][f"best_val_{metric}"] == pytest.approx(result.best_val[metric])


def test_distill_metrics_disagree_and_the_choice_follows(runs):
    by_hr, by_ndcg = runs["hr@100"], runs["ndcg@10"]
    # the first evaluation sees the same summary (the initial users); its λ already differs
    assert by_hr.history[0]["lambda"] != by_ndcg.history[0]["lambda"]
    assert (by_hr.best_step, by_hr.best_lambda) != (by_ndcg.best_step, by_ndcg.best_lambda)


def test_distill_never_returns_worse_than_its_start(distill_case):
    """With a learning rate too small to move the logits, every Gumbel summary is a blurred
    copy of the initial rows and worse than them: the initial rows are returned (best_step 0)."""
    train, val = distill_case
    config = DistillConfig(**{**FAST, "lr": 1e-6, "max_steps": 20, "select_metric": "ndcg@10"})
    result = distill(train, val, config)
    later = [h["val"]["ndcg@10"] for h in _evaluations(result)[1:]]
    assert later and max(later) < result.init_val["ndcg@10"]  # the case is what it claims
    assert result.best_step == 0 and result.best_val == result.init_val
    np.testing.assert_array_equal(result.summary, rows_of(train, result.init_users))
    # a refit on the returned summary gives the reported validation figures
    model, path = fit_select(result.summary, val, config.lambdas, select_metric="ndcg@10")
    assert model.lam == result.best_lambda
    kept = next(p for p in path if p.lam == model.lam)
    assert kept.val["ndcg@10"] == pytest.approx(result.best_val["ndcg@10"], rel=1e-5)


def test_patience_counts_from_the_best_evaluation_including_step_0(distill_case):
    train, val = distill_case
    config = DistillConfig(**{**FAST, "lr": 1e-6, "max_steps": 200, "eval_every": 5,
                              "patience": 10, "select_metric": "ndcg@10"})
    result = distill(train, val, config)
    # step 0 stays the best: the evaluations at 5 and 10 do not beat it, and 10 − 0 ≥ patience
    assert result.best_step == 0 and result.steps_run == 10
    assert [h["step"] for h in _evaluations(result)] == [0, 5, 10]


def test_no_early_stop_before_min_steps(distill_case):
    train, val = distill_case
    config = DistillConfig(**{**FAST, "lr": 1e-6, "max_steps": 200, "eval_every": 5,
                              "patience": 10, "min_steps": 30, "select_metric": "ndcg@10"})
    result = distill(train, val, config)
    # the same run as above, but patience only ends it from step 30 on
    assert result.best_step == 0 and result.steps_run == 30
    assert [h["step"] for h in _evaluations(result)] == [0, 5, 10, 15, 20, 25, 30]


def test_last_step_is_evaluated(distill_case):
    train, val = distill_case
    result = distill(train, val, DistillConfig(**{**FAST, "max_steps": 7}))
    assert [h["step"] for h in _evaluations(result)] == [0, 7]
