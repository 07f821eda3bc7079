"""Evaluate stage: what the gates compare the candidate with, on the same data.

``run(params)`` reads the processed data, the candidate's metrics (``<state_dir>/model``) and the
distill report, and writes ``<reports_dir>/evaluation.json`` (DVC metrics) with

* ``candidate`` — the fit stage's candidate (its family, val/test, every family's figures);
* ``poprec`` and ``ease`` — PopRec and EASE (λ of ``evaluate.ease_lambdas`` on validation
  ``selection.metric``; the fit stage's tuned EASE when it has one for the same grid), val/test;
* ``reference`` — ∞-AE fitted on all users with the candidate's kernel (``fit.lambdas``; the fit
  stage's own fit when it was on all users), or on a sample of ``evaluate.reference_max_users``
  when the n × n kernel would not fit: gate (c)'s reference;
* ``random_users`` — ∞-AE on ``budget`` random users (from the distill report);
* ``summary`` — the ratios the gates and ``dvc metrics`` show (``fidelity`` = candidate test /
  reference test on the selection metric; ``summary_fidelity`` the same for ∞-AE on the summary
  alone).

:func:`evaluate_model_on` scores any fitted ∞-AE (e.g. the champion) on a data set whose item map
may differ. Entry points: :func:`evaluate_task` and ``infrec evaluate --params params.yaml``.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import scipy.sparse as sp
from prefect import task

from models.baselines import EASE_LAMBDAS, PopRec, ease_items, fit_ease_select
from models.infinite_ae import InfAE, batch_rows, evaluate, evaluate_score_batches
from models.kernels import NTKConfig
from models.metrics import sample_users
from tasks.cluster import evaluate_scorer
from tasks.data import Dataset, load_dataset
from tasks.io import read_json, without_timings, write_json
from tasks.params import Params
from tasks.runtime import say, task_options

# score of items the model has never seen: below any real score, above masked (−∞) ones
_UNKNOWN_ITEM_SCORE = np.float32(-3.0e38)


def baseline_metrics(dataset: Dataset, *, ease_lambdas: Sequence[float] | None = None,
                     select_metric: str, max_users: int | None = None,
                     sample_seed: int = 0, ease_max_items: int | None = None,
                     dask_address: str | None = None, batch_size: int = 4096,
                     ease: dict[str, Any] | None = None,
                     log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``{"poprec": {"val", "test"}, "ease": {"lambda", "val", "test", "lambda_path",
    "description", "items", "coverage"}}`` on the same user sample as every other model
    (``max_users``, ``sample_seed``). Above ``ease_max_items`` items EASE is fitted on the most
    popular ``ease_max_items`` (:func:`models.baselines.fit_ease_select`'s ``items``); its
    ``coverage`` is the share of train interactions on them."""
    say_ = log or (lambda _m: None)
    val, test = dataset.val_set(max_users, sample_seed), dataset.test_set(max_users, sample_seed)
    pop = PopRec.fit(dataset.train)
    pop_val = evaluate_scorer(pop, val, batch_size=batch_size, address=dask_address)
    pop_test_stats: dict[str, Any] = {}
    pop_test = evaluate_scorer(pop, test, batch_size=batch_size, address=dask_address,
                               stats=pop_test_stats)
    if ease is not None:  # the fit stage's tuned EASE (same data, grid and metric): reused
        say_(f"PopRec val {select_metric}={pop_val[select_metric]:.2f}; {ease['description']}: "
             f"λ={ease['lambda']:g} (tuned in the fit stage)")
        return {"poprec": {"val": pop_val, "test": pop_test, "test_ci95": pop_test_stats["ci95"]},
                "ease": {k: ease[k] for k in ("lambda", "val", "test", "test_ci95", "description",
                                              "items", "coverage")}}
    items, description, coverage = ease_items(dataset.train, ease_max_items)
    t0 = time.perf_counter()
    ease, path = fit_ease_select(dataset.train, val, ease_lambdas or EASE_LAMBDAS,
                                 select_metric=select_metric, items=items,
                                 on_lambda=lambda lam, m, sec: say_(
                                     f"EASE λ={lam:g}: val {select_metric}={m[select_metric]:.2f} "
                                     f"({sec:.1f}s)"))
    ease_val = next(p["val"] for p in path if p["lambda"] == ease.lam)
    ease_test_stats: dict[str, Any] = {}
    ease_test = evaluate_scorer(ease, test, batch_size=batch_size, address=dask_address,
                                stats=ease_test_stats)
    m = select_metric
    say_(f"PopRec val {m}={pop_val[m]:.2f}; {description}: λ={ease.lam:g} val {m}="
         f"{ease_val[m]:.2f} test {m}={ease_test[m]:.2f} ({time.perf_counter() - t0:.1f}s)")
    return {
        "poprec": {"val": pop_val, "test": pop_test, "test_ci95": pop_test_stats["ci95"]},
        "ease": {"lambda": ease.lam, "val": ease_val, "test": ease_test,
                 "test_ci95": ease_test_stats["ci95"], "description": description,
                 "items": int(ease.n_items_fitted), "coverage": coverage, "lambda_path": path},
    }


def reference_metrics(dataset: Dataset, *, max_users: int = 20000, seed: int = 0,
                      lambdas: Sequence[float] | None = None, depth: int = 1,
                      select_metric: str, batch_size: int = 2048,
                      eval_max_users: int | None = None, sample_seed: int = 0,
                      dask_address: str | None = None, kernel: NTKConfig | None = None,
                      log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """∞-AE on all users (or a ``max_users`` sample): ``{"description", "lambda", "val", …}``,
    scored on the evaluation sample (``eval_max_users``, ``sample_seed``) like every model.
    ``kernel``: its NTK (default: ``depth`` with the paper's variances)."""
    from tasks.fit import fit_dataset

    n = dataset.n_users
    support_users = None
    if n <= max_users:
        user_support, description = None, f"∞-AE on all {n} users"
    else:
        user_support = float(max_users)
        description = f"∞-AE on a random sample of {max_users} of {n} users (largest allowed)"
        sample = sample_users(dataset.val, eval_max_users, sample_seed)
        if sample is not None and len(sample) <= max_users:
            # the validation sample's own users as the support: a random sample of users too,
            # and their validation scores need no cross kernel (K α = X − λ̃α), the cost that
            # dominates a large log's reference
            user_support, support_users = None, sample
            description = (f"∞-AE on the {len(sample)} users of the validation sample (of {n} "
                           "users; evaluate.reference_max_users)")
    model, report = fit_dataset(dataset, lambdas=lambdas, depth=depth, user_support=user_support,
                                seed=seed, select_metric=select_metric, batch_size=batch_size,
                                max_users=eval_max_users, sample_seed=sample_seed,
                                dask_address=dask_address, support_users=support_users,
                                kernel=kernel, log=log)
    return {"description": description, "lambda": model.lam,
            "val": report["metrics"]["val"], "test": report["metrics"]["test"],
            "test_ci95": report["metrics"]["test_ci95"]}


def evaluate_model_on(model: InfAE, model_item_ids: np.ndarray, dataset: Dataset, *,
                      split: str = "test", batch_size: int = 2048, max_users: int | None = None,
                      sample_seed: int = 0) -> dict[str, float]:
    """Metrics of ``model`` on ``dataset``'s ``split``, aligning items by raw id, on the same user
    sample as the candidate (``max_users``, ``sample_seed``).

    Items of the data set that the model does not know get the lowest score; histories are
    mapped into the model's item space (unknown items dropped).
    """
    evalset = (dataset.test_set(max_users, sample_seed) if split == "test"
               else dataset.val_set(max_users, sample_seed))
    model_item_ids = np.asarray(model_item_ids)
    if model_item_ids.shape == dataset.item_ids.shape and np.array_equal(model_item_ids,
                                                                          dataset.item_ids):
        return evaluate(model, evalset, batch_size=batch_size)
    col_of = {int(raw): j for j, raw in enumerate(model_item_ids.tolist())}
    data_cols = np.array([col_of.get(int(raw), -1) for raw in dataset.item_ids.tolist()])
    known = np.flatnonzero(data_cols >= 0)
    to_model = sp.csr_matrix(  # data item i → model column data_cols[i]
        (np.ones(known.size, dtype=np.float32), (known, data_cols[known])),
        shape=(dataset.n_items, model_item_ids.size),
    )

    rows = batch_rows(batch_size, max(dataset.n_items, model_item_ids.size))

    def batches() -> Iterator[tuple[int, np.ndarray]]:
        ctx = evalset.context
        for start in range(0, ctx.shape[0], rows):
            scores = model.scores(ctx[start : start + rows] @ to_model)
            out = np.full((scores.shape[0], dataset.n_items), _UNKNOWN_ITEM_SCORE, dtype=np.float32)
            out[:, known] = scores[:, data_cols[known]]
            yield start, out

    return evaluate_score_batches(batches(), evalset)


def _kernel_of(candidate: dict[str, Any], depth: int) -> NTKConfig:
    """The candidate's NTK (chosen on the summary by the fit stage): gate (c)'s reference is
    ∞-AE on all users with the same kernel. A report without one: ``depth``, the paper's
    variances."""
    k = candidate.get("kernel")
    if not k:
        return NTKConfig(depth=depth)
    return NTKConfig(depth=int(k["depth"]), w_std=math.sqrt(k["w_var"]), b_std=math.sqrt(k["b_var"]))


def summarise(evaluation: dict[str, Any], metric: str) -> dict[str, float]:
    """The ratios shown by ``dvc metrics`` and the verdict, on the selection metric."""
    cand, ref = evaluation["candidate"], evaluation["reference"]
    out = {
        "metric": metric,
        "candidate_test": cand["test"][metric],
        "reference_test": ref["test"][metric],
        "ease_test": evaluation["ease"]["test"][metric],
        "fidelity": _ratio(cand["test"][metric], ref["test"][metric]),
        "ease_fraction_val": _ratio(cand["val"][metric], evaluation["ease"]["val"][metric]),
        "pop_margin_val": cand["val"][metric] - evaluation["poprec"]["val"][metric],
    }
    if cand.get("family"):
        out["family"] = cand["family"]
        out["fit_on"] = cand.get("fit_on")
    summary_model = cand.get("summary_model")
    if summary_model:  # the Distill-CF summary's own fidelity (∞-AE fitted on it alone)
        out["summary_test"] = summary_model["test"][metric]
        out["summary_fidelity"] = _ratio(summary_model["test"][metric], ref["test"][metric])
    sample = evaluation.get("sample") or cand.get("sample")
    if sample:
        out["test_users"] = sample["test_users"]
        out["test_population"] = sample["test_population"]
    if "test_ci95" in cand:
        out["candidate_test_ci95"] = cand["test_ci95"].get(metric, float("nan"))
    random = evaluation.get("random_users")
    if random:
        out["random_users_test"] = random["test"][metric]
        out["candidate_vs_random_test"] = cand["test"][metric] - random["test"][metric]
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def run(params: Params, log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """The evaluate stage (see the module docstring)."""
    log = log or say()
    paths, ev, f, metric = params.paths(), params.evaluate, params.fit, params.selection.metric
    dataset = load_dataset(paths.processed)
    candidate = read_json(paths.model / "metrics.json", "the fit stage's metrics")
    distill_report = read_json(paths.distill_report, "the distill stage's report")
    ease = candidate.pop("ease", None)
    if ease is not None and not (ease.get("lambdas") == list(ev.ease_lambdas or EASE_LAMBDAS)
                                 and ease.get("max_items") == ev.ease_max_items
                                 and ease.get("select_metric") == metric):
        ease = None  # tuned with other settings: tune again
    base = baseline_metrics(dataset, ease_lambdas=ev.ease_lambdas, select_metric=metric,
                            max_users=ev.max_users, sample_seed=ev.sample_seed,
                            ease_max_items=ev.ease_max_items, dask_address=ev.dask_address,
                            ease=ease, log=log)
    ref = candidate.pop("reference", None)
    kernel = _kernel_of(candidate, f.depth)
    ref_seed, batch_size = ev.reference_seed, f.batch_size
    if ref is not None and ref.get("lambdas") == list(f.lambdas) and (
            dataset.n_users <= ev.reference_max_users):
        ref = {k: ref[k] for k in ("description", "lambda", "val", "test", "test_ci95")}
        ref["description"] += " (the fit stage's ∞-AE: same kernel, λ grid and data)"
    else:
        ref = reference_metrics(dataset, max_users=ev.reference_max_users, seed=ref_seed,
                                lambdas=f.lambdas, depth=f.depth, select_metric=metric,
                                batch_size=batch_size, eval_max_users=ev.max_users,
                                sample_seed=ev.sample_seed, dask_address=ev.dask_address,
                                kernel=kernel, log=log)
    log(f"reference: {ref['description']}, λ={ref['lambda']:g}, test {metric}="
        f"{ref['test'][metric]:.2f}")
    base["ease"].pop("lambda_path", None)
    evaluation = {"candidate": candidate, **base, "reference": ref,
                  "random_users": distill_report.get("random_users"),
                  "coverage": distill_report.get("coverage"),
                  "sample": candidate.get("sample")}
    evaluation = {"summary": summarise(evaluation, metric), **evaluation}
    evaluation["summary"]["gates"] = data_gates(params, evaluation, dataset)
    write_json(paths.evaluation, without_timings(evaluation))
    return evaluation


def data_gates(params: Params, evaluation: dict[str, Any], dataset: Any) -> dict[str, Any]:
    """The gates this stage's numbers decide alone — (0) evidence, (a) baselines, (c) fidelity
    with coverage — each ``{passed, value, threshold}``, with the ``gates.*`` thresholds they
    read (declared in dvc.yaml: a changed threshold re-runs evaluate, and `dvc exp show` and
    `dvc metrics diff` show the outcome). Gate (b) compares with the registry's champion, which
    no DVC stage reads: the promote step decides it — and all four again — after registering."""
    from tasks.gates import GateThresholds, decide_gates, evaluated_users, gate_inputs

    g, metric = params.gates, params.selection.metric
    thresholds = GateThresholds(metric=metric, pop_margin=g.pop_margin,
                                ease_fraction=g.ease_fraction,
                                fidelity_fraction=g.fidelity_fraction,
                                min_eval_users=g.min_eval_users,
                                min_summary_coverage=g.min_summary_coverage)
    verdict = decide_gates(gate_inputs(evaluation, metric, None, evaluated_users(dataset)),
                           thresholds)
    return {r.name: {"passed": r.passed, "value": r.value, "threshold": r.threshold}
            for r in verdict.gates if r.name != "champion"}


@task(name="evaluate", **task_options())
def evaluate_task(params: Params) -> dict[str, Any]:
    return run(params)


__all__ = ["run", "evaluate_task", "baseline_metrics", "reference_metrics", "evaluate_model_on",
           "summarise"]
