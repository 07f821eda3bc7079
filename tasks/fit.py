"""Fit stage: the candidate — NTK and λ chosen on the summary, ∞-AE on all users or on the
summary (``fit.on``), the families of ``fit.families`` compared on validation.

``run(params)`` reads ``<state_dir>/data/processed`` and ``<state_dir>/data/summary.parquet`` and
calls :func:`fit_candidate` (the steps are in its docstring), then writes

* ``<state_dir>/model`` — the model directory of the family kept (:mod:`tasks.model_store`);
* ``<reports_dir>/metrics.json`` — the candidate's ``family``, ``fit_on``, ``lambda``, ``val``,
  ``test``, and ``families`` (every family's val/test/seconds), ``kernel_search``,
  ``summary_model`` (∞-AE on the summary alone), ``ease`` and ``reference`` (reused by the
  evaluate stage) (DVC metrics);
* ``<reports_dir>/lambda_path.json`` and ``plots/lambda_path.png`` — the candidate ∞-AE's
  validation metrics versus λ.

:func:`fit_dataset` is one ∞-AE fit on any support (all users, a user sample, a summary file):
the evaluate stage's full-data reference and the sweeps use it. Entry points: :func:`fit_task`
and ``infrec fit --params params.yaml`` — both call ``run``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
from prefect import task

from models.baselines import EASE, EASE_LAMBDAS, ease_items, fit_ease_select
from models.blend import Blend, mix, select_weight, zscore_rows
from models.infinite_ae import (FULL_DATA_LAMBDAS, SUMMARY_LAMBDAS, InfAE, LambdaGridError,
                                batch_accumulator, batch_rows, evaluate, evaluation_plan,
                                fit_select, kernel_matrix, row_slice, support_gram)
from models.kernels import NTKConfig
from models.metrics import RankingAccumulator, finish_evaluation
from tasks import stop
from tasks.cluster import evaluate_scorer
from tasks.data import Dataset, load_dataset
from tasks.errors import InputError
from tasks.io import without_timings, write_json
from tasks.model_store import save_model
from tasks.params import Params
from tasks.runtime import say, task_options


def choose_support(
    dataset: Dataset,
    *,
    support_path: str | Path | None = None,
    user_support: float | None = None,
    seed: int = 0,
    support_users: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, Any], bool]:
    """The support rows to fit on: all train users, a user sample (``user_support``: a share or
    a count drawn with ``seed``; or ``support_users``: these rows), or a summary file.

    Returns ``(support, description, support_is_val_context)``.
    """
    if support_users is not None:
        rows = np.asarray(support_users, dtype=np.int64)
        return (dataset.train[rows].toarray().astype(np.float32),
                {"kind": "user_rows", "rows": int(rows.size)}, False)
    if support_path is not None:
        from tasks.summary import read_summary

        support, item_ids, meta = read_summary(support_path)
        if len(item_ids) != dataset.n_items or not np.array_equal(item_ids, dataset.item_ids):
            raise InputError(
                f"{support_path}: its item map ({len(item_ids)} items) does not match the data "
                f"directory {dataset.path} ({dataset.n_items} items)"
            )
        return support, {"kind": "summary", "rows": int(support.shape[0]),
                         "sampler": meta.get("sampler"), "meta": meta}, False
    train = dataset.train
    if user_support is not None and user_support < 1.0 * dataset.n_users:
        n_keep = (int(round(user_support * dataset.n_users)) if user_support <= 1.0
                  else int(user_support))
        if n_keep < 1:
            raise InputError(f"user_support={user_support} keeps no user")
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(dataset.n_users, size=n_keep, replace=False))
        support = train[rows].toarray().astype(np.float32)
        return support, {"kind": "user_sample", "rows": n_keep, "seed": seed}, False
    return (train.toarray().astype(np.float32), {"kind": "all_users", "rows": dataset.n_users},
            True)


def fit_dataset(
    dataset: Dataset,
    *,
    lambdas: Sequence[float] | None = None,
    depth: int = 1,
    select_metric: str,
    support_path: str | Path | None = None,
    user_support: float | None = None,
    seed: int = 0,
    batch_size: int = 2048,
    max_users: int | None = None,
    sample_seed: int = 0,
    dask_address: str | None = None,
    support_users: np.ndarray | None = None,
    kernel: NTKConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[InfAE, dict[str, Any]]:
    """Fit, select λ on validation ``select_metric``, evaluate on test: ``(model, report)``.

    ``max_users``/``sample_seed``: validation and test score a fixed seeded sample of that many
    users of each split when there are more (:meth:`tasks.data.Dataset.val_set`); the report's
    ``sample`` says how many were scored, of how many, and ``val_ci95``/``test_ci95`` give the
    half-widths of the 95% intervals. ``support_users``: fit on these train rows; when they are
    the validation sample itself, validation needs no cross kernel (``K α = X − λ̃α``).
    ``dask_address``: the test users are scored on that Dask
    cluster (:func:`tasks.cluster.evaluate_scorer`; same figures). A λ that cannot be solved even stabilised is skipped
    (``status`` in the λ path); a grid where every λ fails is one :class:`InputError`-free
    ``RuntimeError`` naming the kernel and the grid.
    """
    say_ = log or (lambda _msg: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    support, support_info, is_ctx = choose_support(
        dataset, support_path=support_path, user_support=user_support, seed=seed,
        support_users=support_users,
    )
    if lambdas is None:
        lambdas = FULL_DATA_LAMBDAS if support_info["kind"] != "summary" else SUMMARY_LAMBDAS
    config = kernel if kernel is not None else NTKConfig(depth=depth)
    val = dataset.val_set(max_users, sample_seed)
    val_rows = None
    if is_ctx and val.rows is not None:  # the support is every user; validation a sample of them
        is_ctx, val_rows = False, val.rows
    elif (support_users is not None and val.rows is not None
          and np.array_equal(val.rows, support_users)):  # the support is the validation sample
        is_ctx = True
    timings["prepare"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    kernel = kernel_matrix(support, config)
    timings["kernel"] = time.perf_counter() - t1
    say_(f"kernel {kernel.shape[0]}×{kernel.shape[1]} in {timings['kernel']:.2f}s")

    t2 = time.perf_counter()

    def on_lambda(result) -> None:
        if result.skipped:
            say_(f"λ={result.lam:g} skipped: K + λ̃I not positive definite even stabilised "
                 f"({result.seconds:.1f}s)")
            stop.check()
            return
        note = f" (stabilised: λ̃={result.lam_scaled:.3g})" if result.stabilised else ""
        say_(f"λ={result.lam:g}{note}: val {select_metric}={result.val[select_metric]:.2f} "
             f"({result.seconds:.1f}s)")
        stop.check()  # SIGTERM/SIGINT: end between λs (tasks/stop.py)

    try:
        model, path = fit_select(
            support, val, lambdas, config, support_is_val_context=is_ctx, val_rows=val_rows,
            batch_size=batch_size, kernel=kernel, on_lambda=on_lambda, select_metric=select_metric,
        )
    except LambdaGridError as exc:
        raise RuntimeError(f"∞-AE on {support_info['kind']} ({support.shape[0]} rows): {exc}") from None
    del kernel
    timings["fit"] = time.perf_counter() - t2
    best = next(r for r in path if r.lam == model.lam)
    val_stats: dict[str, Any] = {}
    if val.rows is not None:  # the kept λ's interval, on the same sample
        val_ci = _val_interval(model, val, batch_size, val_rows)
        val_stats = {"users": val.n_users, "ci95": val_ci}

    t3 = time.perf_counter()
    test_set = dataset.test_set(max_users, sample_seed)
    test_stats: dict[str, Any] = {}
    test = evaluate_scorer(model, test_set, batch_size=batch_size, address=dask_address,
                           stats=test_stats, log=say_)
    timings["evaluate"] = time.perf_counter() - t3
    say_(f"λ={model.lam:g} test {select_metric}={test[select_metric]:.2f} "
         f"± {test_stats['ci95'].get(select_metric, 0.0):.2f} (95%, {test_stats['users']} users"
         + (f" of {test_set.population}" if test_set.population else "") + ")")
    report = {
        "metrics": {"lambda": model.lam, "val": best.val, "test": test,
                    "test_ci95": test_stats["ci95"],
                    **({"val_ci95": val_stats["ci95"]} if val_stats else {}),
                    "sample": sample_description(val, test_set, max_users, sample_seed)},
        "lambda_path": [
            {"lambda": r.lam, "lambda_scaled": r.lam_scaled, "stabilised": r.stabilised,
             "status": r.status, **r.val}
            for r in path
        ],
        "support": support_info,
        "select_metric": select_metric,
        "seconds": timings,
    }
    return model, report


def sample_description(val: Any, test: Any, max_users: int | None, seed: int) -> dict[str, Any]:
    """How many users each split scored, of how many (equal when every user was scored)."""
    return {"max_users": max_users, "seed": seed,
            "val_users": val.n_users, "val_population": val.population or val.n_users,
            "test_users": test.n_users, "test_population": test.population or test.n_users}


def _val_interval(model: InfAE, val: Any, batch_size: int, val_rows: Any) -> dict[str, float]:
    """95% half-widths of the kept model's validation metrics on the sample ``val``."""
    from models.infinite_ae import evaluate_score_batches

    stats: dict[str, Any] = {}
    if val_rows is not None:  # validation users are support rows: K α = X − λ̃ α
        x, alpha = model.support, model.alpha
        batches = ((s, x[val_rows[s:s + batch_size]] - model.lam_scaled * alpha[val_rows[s:s + batch_size]])
                   for s in range(0, len(val_rows), batch_size))
        evaluate_score_batches(batches, val, stats=stats)
    else:
        evaluate(model, val, batch_size=batch_size, stats=stats)
    return stats["ci95"]


def kernel_config(depth: int, w_var: float, b_var: float) -> NTKConfig:
    """The NTK of depth ``depth`` with weight and bias variances σ_w², σ_b²."""
    return NTKConfig(depth=int(depth), w_std=math.sqrt(w_var), b_std=math.sqrt(b_var))


def kernel_description(config: NTKConfig) -> dict[str, float]:
    return {"depth": config.depth, "w_var": round(config.w_std**2, 12),
            "b_var": round(config.b_std**2, 12)}


def search_kernel(support: np.ndarray, val: Any, grid: Sequence[tuple[int, float, float]],
                  lambdas: Sequence[float], select_metric: str, batch_size: int,
                  log: Callable[[str], None]) -> tuple[InfAE, list, list[dict[str, Any]]]:
    """∞-AE on ``support`` (the summary) for every ``(depth, σ_w², σ_b²)`` of ``grid`` × λ of
    ``lambdas``; the best on validation ``select_metric`` (ties: the first). Returns the best
    model, its λ path and the search table ``[{"depth", "w_var", "b_var", "lambda", "val",
    "seconds"}]`` (validation ``select_metric`` of each kernel's best λ)."""
    best: tuple[InfAE, list] | None = None
    best_value = -math.inf
    table: list[dict[str, Any]] = []
    for depth, w_var, b_var in grid:
        config = kernel_config(depth, w_var, b_var)
        started = time.perf_counter()
        try:
            model, path = fit_select(support, val, lambdas, config, select_metric=select_metric,
                                     batch_size=batch_size, path_metrics=(select_metric,),
                                     on_lambda=lambda _r: stop.check())
        except LambdaGridError as exc:
            log(f"kernel depth={depth} σ_w²={w_var:g} σ_b²={b_var:g}: every λ failed ({exc})")
            table.append({**kernel_description(config), "lambda": None, "val": None,
                          "seconds": time.perf_counter() - started})
            continue
        value = next(r for r in path if r.lam == model.lam).val[select_metric]
        seconds = time.perf_counter() - started
        table.append({**kernel_description(config), "lambda": model.lam,
                      "val": {select_metric: value}, "seconds": round(seconds, 2)})
        log(f"kernel depth={depth} σ_w²={w_var:g} σ_b²={b_var:g} on the summary: λ={model.lam:g} "
            f"val {select_metric}={value:.2f} ({seconds:.1f}s)")
        if value > best_value:
            best, best_value = (model, path), value
    if best is None:
        raise RuntimeError(f"∞-AE on the summary ({support.shape[0]} rows): no kernel of the grid "
                           f"{list(grid)} could be fitted at any λ of {list(lambdas)}")
    return best[0], best[1], table


def fit_on_choice(setting: str, n_users: int, full_max_users: int) -> str:
    """``full`` or ``summary``: the setting itself, or for ``auto`` full when the training users
    are at most ``full_max_users``."""
    if setting == "auto":
        return "full" if n_users <= full_max_users else "summary"
    return setting


def _path_entries(path: list) -> list[dict[str, Any]]:
    return [{"lambda": r.lam, "lambda_scaled": r.lam_scaled, "stabilised": r.stabilised,
             "status": r.status, **r.val} for r in path]


def fit_candidate(dataset: Dataset, params: Params, *, support_path: str | Path,
                  log: Callable[[str], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """The fit stage's work on ``dataset``: ``(model, report)``.

    1. the NTK (``fit.kernel_depths`` × ``w_vars`` × ``b_vars``) and λ (``summary_lambdas``) are
       chosen on validation ``selection.metric`` with ∞-AE fitted on the summary — cheap: the
       kernel is budget × budget; that summary-fitted ∞-AE is also scored on test (the summary's
       fidelity);
    2. the final ∞-AE is fitted on every training user (``fit.on`` full, or auto with at most
       ``fit.full_max_users`` users) with that kernel and λ of ``fit.lambdas`` chosen on
       validation — or is the summary's;
    3. each family of ``fit.families`` is built: ``infinite_ae`` (that model) and ``blend`` (it,
       z-scored and mixed with a tuned EASE, the weight of ``fit.blend_weights`` chosen on
       validation); the family with the best validation ``selection.metric`` is the candidate.
       Test metrics are computed for every family (reported, never used to choose).
    """
    say_ = log or (lambda _msg: None)
    f, ev, metric = params.fit, params.evaluate, params.selection.metric
    max_users, sample_seed = ev.max_users, ev.sample_seed
    timings: dict[str, float] = {}
    val = dataset.val_set(max_users, sample_seed)
    test_set = dataset.test_set(max_users, sample_seed)

    t0 = time.perf_counter()
    summary, summary_info, _ = choose_support(dataset, support_path=support_path)
    summary_model, summary_path, search = search_kernel(
        summary, val, f.kernel_grid(), f.summary_lambdas, metric, f.batch_size, say_)
    config = summary_model.config
    summary_val = evaluate_scorer(summary_model, val, batch_size=f.batch_size)
    summary_stats: dict[str, Any] = {}
    summary_test = evaluate_scorer(summary_model, test_set, batch_size=f.batch_size,
                                   address=ev.dask_address, stats=summary_stats)
    timings["kernel_search"] = time.perf_counter() - t0
    say_(f"kernel chosen on the summary: depth={config.depth} σ_w²={config.w_std**2:g} "
         f"σ_b²={config.b_std**2:g} λ={summary_model.lam:g}; the summary's ∞-AE: test {metric}="
         f"{summary_test[metric]:.2f} ({timings['kernel_search']:.1f}s)")

    fit_on = fit_on_choice(f.on, dataset.n_users, f.full_max_users)
    gram = None
    t1 = time.perf_counter()
    if fit_on == "full":
        support = _dense_train(dataset)
        gram = support_gram(support)
        kernel = kernel_matrix(support, config, gram=gram)
        on_support = val.rows is None
        infae, path = _fit_full(support, kernel, val, f.lambdas, config, metric, f.batch_size,
                                on_support, say_)
        del kernel
        infae_val = next(r for r in path if r.lam == infae.lam).val
        support_info = {"kind": "all_users", "rows": dataset.n_users}
    else:
        infae, path, infae_val, support_info = summary_model, summary_path, summary_val, summary_info
        on_support = False
    timings["infinite_ae"] = time.perf_counter() - t1
    say_(f"∞-AE on {'all ' + str(dataset.n_users) + ' users' if fit_on == 'full' else 'the summary'}"
         f": λ={infae.lam:g} val {metric}={infae_val[metric]:.2f} ({timings['infinite_ae']:.1f}s)")

    families: dict[str, dict[str, Any]] = {"infinite_ae": {
        "val": infae_val, "lambda": infae.lam, "seconds": round(timings["infinite_ae"], 2),
        "description": f"∞-AE on {'all training users' if fit_on == 'full' else 'the summary'}"}}
    ease_block = None
    blend = None
    if "blend" in f.families:
        t2 = time.perf_counter()
        ease, ease_block = tuned_ease(dataset, val, params, say_)
        weight, weight_path = select_weight(
            _val_pairs(infae, ease, val, f.batch_size, support if on_support else None),
            val, f.blend_weights, metric)
        blend = Blend(a=infae, b=ease, weight=weight)
        bval = next(p["val"] for p in weight_path if p["weight"] == weight)
        timings["blend"] = time.perf_counter() - t2
        families["blend"] = {
            "val": bval, "weight": weight, "ease_lambda": ease.lam,
            "weight_path": [{"weight": p["weight"], metric: p["val"][metric]} for p in weight_path],
            "seconds": round(timings["blend"], 2),
            "description": f"(1 − w)·z(∞-AE) + w·z(EASE λ={ease.lam:g}), w={weight:g} on validation"}
        say_(f"blend: w={weight:g} (EASE λ={ease.lam:g}) val {metric}={bval[metric]:.2f} "
             f"({timings['blend']:.1f}s)")

    t3 = time.perf_counter()
    tests = _test_all(infae, blend, test_set, gram if fit_on == "full" else None,
                      f.batch_size, ev.dask_address)
    timings["test"] = time.perf_counter() - t3
    for name, (test, ci95) in tests.items():
        if name == "ease":
            ease_block.update({"test": test, "test_ci95": ci95})
        else:
            families[name].update({"test": test, "test_ci95": ci95})
    names = [n for n in f.families if n in families]
    chosen = max(names, key=lambda n: (families[n]["val"][metric], -names.index(n)))
    others = ", ".join(f"{n} {families[n]['val'][metric]:.2f}" for n in names if n != chosen)
    reason = (f"{chosen}: the best validation {metric} ({families[chosen]['val'][metric]:.2f}"
              + (f" vs {others}" if others else "") + "); test not consulted")
    say_(f"candidate family {reason}")
    model = blend if chosen == "blend" else infae
    sample = sample_description(val, test_set, max_users, sample_seed)
    metrics = {
        "family": chosen, "selected_because": reason,
        "fit_on": fit_on, "fit_on_setting": f.on,
        "lambda": infae.lam, "val": families[chosen]["val"], "test": families[chosen]["test"],
        "test_ci95": families[chosen]["test_ci95"], "sample": sample,
        "kernel": kernel_description(config), "kernel_search": search,
        "families": families,
        "summary_model": {"lambda": summary_model.lam, "val": summary_val, "test": summary_test,
                          "test_ci95": summary_stats["ci95"],
                          "description": f"∞-AE on the summary ({summary.shape[0]} rows)"},
        **({"weight": blend.weight} if chosen == "blend" else {}),
    }
    if ease_block is not None:
        metrics["ease"] = ease_block
    if fit_on == "full":  # gate (c)'s reference is this very fit: the evaluate stage reuses it
        metrics["reference"] = {"description": f"∞-AE on all {dataset.n_users} users",
                                "lambda": infae.lam, "lambdas": list(f.lambdas),
                                "kernel": kernel_description(config), "val": infae_val,
                                "test": families["infinite_ae"]["test"],
                                "test_ci95": families["infinite_ae"]["test_ci95"]}
    report = {"metrics": metrics, "lambda_path": _path_entries(path), "support": support_info,
              "select_metric": metric, "seconds": timings}
    return model, report


def _dense_train(dataset: Dataset) -> np.ndarray:
    support, _, _ = choose_support(dataset)
    return support


def _fit_full(support: np.ndarray, kernel: np.ndarray, val: Any, lambdas: Sequence[float],
              config: NTKConfig, metric: str, batch_size: int, on_support: bool,
              log: Callable[[str], None]) -> tuple[InfAE, list]:
    def on_lambda(result) -> None:
        if not result.skipped:
            log(f"λ={result.lam:g}: val {metric}={result.val[metric]:.2f} ({result.seconds:.1f}s)")
        stop.check()

    try:
        return fit_select(support, val, lambdas, config, support_is_val_context=on_support,
                          val_rows=None if on_support else val.rows, batch_size=batch_size,
                          kernel=kernel, on_lambda=on_lambda, select_metric=metric)
    except LambdaGridError as exc:
        raise RuntimeError(f"∞-AE on all users ({support.shape[0]} rows): {exc}") from None


def tuned_ease(dataset: Dataset, val: Any, params: Params,
               log: Callable[[str], None]) -> tuple[EASE, dict[str, Any]]:
    """EASE with λ of ``evaluate.ease_lambdas`` chosen on validation ``selection.metric`` (on the
    ``evaluate.ease_max_items`` most popular items above that many) — the same EASE the gates
    compare with: the evaluate stage reuses this block (``lambdas``, ``max_items`` say which)."""
    ev, metric = params.evaluate, params.selection.metric
    lambdas = list(ev.ease_lambdas or EASE_LAMBDAS)
    items, description, coverage = ease_items(dataset.train, ev.ease_max_items)
    t0 = time.perf_counter()
    ease, path = fit_ease_select(dataset.train, val, lambdas, select_metric=metric, items=items,
                                 on_lambda=lambda lam, m, sec: (log(
                                     f"EASE λ={lam:g}: val {metric}={m[metric]:.2f} ({sec:.1f}s)"),
                                     stop.check()))
    block = {"lambda": ease.lam, "val": next(p["val"] for p in path if p["lambda"] == ease.lam),
             "description": description, "items": int(ease.n_items_fitted), "coverage": coverage,
             "lambdas": lambdas, "max_items": ev.ease_max_items, "select_metric": metric,
             "seconds": round(time.perf_counter() - t0, 2)}
    return ease, block


def _val_pairs(infae: InfAE, ease: EASE, val: Any, batch_size: int,
               support: np.ndarray | None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(start, ∞-AE scores, EASE scores)`` of the validation users, batch by batch; with
    ``support`` (∞-AE fitted on every user, who are the validation users) ∞-AE's scores are
    ``K α = X − λ̃α``, no kernel product."""
    rows = batch_rows(batch_size, infae.n_items)
    ctx = val.context
    for start in range(0, ctx.shape[0], rows):
        stop.check()
        h = ctx[start : start + rows]
        if support is not None:
            sa = support[start : start + rows] - np.float32(infae.lam_scaled) * infae.alpha[start : start + rows]
        else:
            sa = infae.scores(h)
        (_, sb), = list(ease.iter_scores(h, batch_size=rows))
        yield start, sa, sb


def _test_all(infae: InfAE, blend: Blend | None, test: Any, gram: np.ndarray | None,
              batch_size: int, dask_address: str | None
              ) -> dict[str, tuple[dict[str, float], dict[str, float]]]:
    """Test metrics and 95% half-widths of ∞-AE, and with ``blend`` of EASE and the blend, from
    one scoring of each model per batch of test users. ``gram``: ``X Xᵀ`` of an ∞-AE fitted on
    every user, who are then the test users (kernel rows from the Gram)."""
    def done(acc: RankingAccumulator) -> tuple[dict[str, float], dict[str, float]]:
        stats: dict[str, Any] = {}
        result = finish_evaluation(acc, None, stats)
        return result, stats["ci95"]

    if dask_address:  # every final evaluation on the cluster, one model at a time
        out = {}
        for name, model in (("infinite_ae", infae),) + ((("ease", blend.b), ("blend", blend))
                                                        if blend is not None else ()):
            stats: dict[str, Any] = {}
            out[name] = (evaluate_scorer(model, test, batch_size=batch_size, address=dask_address,
                                         stats=stats), stats["ci95"])
        return out
    plan = evaluation_plan(None)
    names = ["infinite_ae"] + (["ease", "blend"] if blend is not None else [])
    accs = {n: RankingAccumulator(weights=test.weights, ks=plan.ks) for n in names}
    if gram is not None and test.rows is None:
        a_batches = infae.iter_scores_of_support_users(test.context, gram, batch_size)
    else:
        a_batches = infae.iter_scores(test.context, batch_size)
    for start, sa in a_batches:
        stop.check()
        part = row_slice(test, start, start + sa.shape[0])
        if blend is not None:
            (_, sb), = list(blend.b.iter_scores(part.context, batch_size=sa.shape[0]))
            za, zb = zscore_rows(sa), zscore_rows(sb)
            accs["blend"].merge(batch_accumulator(mix(za, zb, blend.weight), part, plan))
            accs["ease"].merge(batch_accumulator(sb, part, plan))
        accs["infinite_ae"].merge(batch_accumulator(sa, part, plan))
    return {n: done(acc) for n, acc in accs.items()}


def run(params: Params, log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """The fit stage (see the module docstring)."""
    from tasks.plots import plot_lambda_path

    log = log or say()
    paths, metric = params.paths(), params.selection.metric
    dataset = load_dataset(paths.processed)
    model, report = fit_candidate(dataset, params, support_path=paths.summary, log=log)
    tracked = without_timings(report["metrics"])  # DVC outputs: the same bytes on every run
    save_model(model, paths.model, dataset.item_ids, {**report, "metrics": tracked},
               dataset.data_version, overwrite=True)
    write_json(paths.metrics, tracked)
    write_json(paths.lambda_path, report["lambda_path"])
    plot_lambda_path(report["lambda_path"], paths.plots / "lambda_path.png",
                     metrics=dict.fromkeys([metric, "hr@100"]))
    m = report["metrics"]
    return {"model_dir": str(paths.model), "lambda": m["lambda"], "family": m["family"],
            "fit_on": m["fit_on"], "val": m["val"], "test": m["test"], "sample": m["sample"],
            "metrics": m, "lambda_path": report["lambda_path"], "seconds": report["seconds"]}


@task(name="fit", **task_options())
def fit_task(params: Params) -> dict[str, Any]:
    return run(params)


__all__ = ["run", "fit_task", "fit_dataset", "fit_candidate", "choose_support", "search_kernel",
           "fit_on_choice", "tuned_ease", "kernel_config"]
