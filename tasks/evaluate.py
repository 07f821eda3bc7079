"""Evaluation for the gates: baselines, the full-data reference, and a model on foreign data.

* :func:`baseline_metrics` — PopRec and a tuned EASE (λ on validation HR@100), val + test;
* :func:`reference_metrics` — ∞-AE fitted on all users of the same data (gate c's reference),
  or on the largest user sample allowed (``max_users``) when the n × n kernel would not fit;
* :func:`evaluate_model_on` — test metrics of a fitted ∞-AE (e.g. the champion) on a data set
  whose item map may differ from the model's: items are aligned by raw id, unknown ones rank last.

No Prefect or MLflow here (see ``tasks.prefect_tasks``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import scipy.sparse as sp

from models.baselines import EASE_LAMBDAS, PopRec, fit_ease_select
from models.infinite_ae import InfAE, evaluate, evaluate_score_batches
from tasks.data import Dataset

# score of items the model has never seen: below any real score, above masked (−∞) ones
_UNKNOWN_ITEM_SCORE = np.float32(-3.0e38)


def baseline_metrics(
    dataset: Dataset,
    *,
    ease_lambdas: Sequence[float] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``{"poprec": {"val", "test"}, "ease": {"lambda", "val", "test", "lambda_path"}}``."""
    say = log or (lambda _m: None)
    val, test = dataset.val_set(), dataset.test_set()
    pop = PopRec.fit(dataset.train)
    pop_val = evaluate_score_batches(pop.iter_scores(val.context), val)
    pop_test = evaluate_score_batches(pop.iter_scores(test.context), test)
    say(f"PopRec val ndcg@10={pop_val['ndcg@10']:.2f} test ndcg@10={pop_test['ndcg@10']:.2f}")
    ease, path = fit_ease_select(dataset.train, val, ease_lambdas or EASE_LAMBDAS)
    ease_val = next(p["val"] for p in path if p["lambda"] == ease.lam)
    ease_test = evaluate_score_batches(ease.iter_scores(test.context), test)
    say(f"EASE λ={ease.lam:g} val ndcg@10={ease_val['ndcg@10']:.2f} "
        f"test ndcg@10={ease_test['ndcg@10']:.2f}")
    return {
        "poprec": {"val": pop_val, "test": pop_test},
        "ease": {"lambda": ease.lam, "val": ease_val, "test": ease_test, "lambda_path": path},
    }


def reference_metrics(
    dataset: Dataset,
    *,
    max_users: int = 20000,
    seed: int = 0,
    lambdas: Sequence[float] | None = None,
    depth: int = 1,
    batch_size: int = 2048,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """∞-AE on all users (or a ``max_users`` sample): ``{"description", "lambda", "val", …}``."""
    from tasks.fit import fit_dataset

    n = dataset.n_users
    if n <= max_users:
        user_support, description = None, f"∞-AE on all {n} users"
    else:
        user_support = float(max_users)
        description = f"∞-AE on a random sample of {max_users} of {n} users (largest allowed)"
    model, report = fit_dataset(
        dataset, lambdas=lambdas, depth=depth, user_support=user_support, seed=seed,
        batch_size=batch_size, log=log,
    )
    return {
        "description": description,
        "lambda": model.lam,
        "val": report["metrics"]["val"],
        "test": report["metrics"]["test"],
        "support": report["support"],
    }


def evaluate_model_on(
    model: InfAE,
    model_item_ids: np.ndarray,
    dataset: Dataset,
    *,
    split: str = "test",
    batch_size: int = 2048,
) -> dict[str, float]:
    """Metrics of ``model`` on ``dataset``'s ``split``, aligning items by raw id.

    Items of the data set that the model does not know get the lowest score; histories are
    mapped into the model's item space (unknown items dropped).
    """
    evalset = dataset.test_set() if split == "test" else dataset.val_set()
    model_item_ids = np.asarray(model_item_ids)
    same_items = model_item_ids.shape == dataset.item_ids.shape
    if same_items and np.array_equal(model_item_ids, dataset.item_ids):
        return evaluate(model, evalset, batch_size=batch_size)
    col_of = {int(raw): j for j, raw in enumerate(model_item_ids.tolist())}
    data_cols = np.array([col_of.get(int(raw), -1) for raw in dataset.item_ids.tolist()])
    known = np.flatnonzero(data_cols >= 0)
    # data item i → model column data_cols[i] (unknown items have no column)
    to_model = sp.csr_matrix(
        (np.ones(known.size, dtype=np.float32), (known, data_cols[known])),
        shape=(dataset.n_items, model_item_ids.size),
    )

    def batches() -> Iterator[tuple[int, np.ndarray]]:
        ctx = evalset.context
        for start in range(0, ctx.shape[0], batch_size):
            scores = model.scores(ctx[start : start + batch_size] @ to_model)
            out = np.full((scores.shape[0], dataset.n_items), _UNKNOWN_ITEM_SCORE, dtype=np.float32)
            out[:, known] = scores[:, data_cols[known]]
            yield start, out

    return evaluate_score_batches(batches(), evalset)


__all__ = ["baseline_metrics", "reference_metrics", "evaluate_model_on"]


def evaluation_report(
    data_dir: str | Path,
    model_dir: str | Path,
    out_path: str | Path,
    *,
    max_reference_users: int = 20000,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``infrec evaluate`` (the DVC evaluate stage): candidate vs PopRec, EASE and full-data ∞-AE.

    Writes ``out_path`` (JSON, DVC metrics) atomically; the fit's λ paths stay in the model dir.
    """
    import json

    from tasks.data import load_dataset
    from tasks.errors import InputError
    from tasks.io import write_json

    dataset = load_dataset(data_dir)
    metrics_file = Path(model_dir) / "metrics.json"
    if not metrics_file.is_file():
        raise InputError(f"{metrics_file}: missing (not an `infrec fit` model directory?)")
    candidate = json.loads(metrics_file.read_text())
    base = baseline_metrics(dataset, log=log)
    ref = reference_metrics(dataset, max_users=max_reference_users, log=log)
    base["ease"].pop("lambda_path", None)
    summary = {
        "candidate_test_ndcg@10": candidate["test"]["ndcg@10"],
        "ease_test_ndcg@10": base["ease"]["test"]["ndcg@10"],
        "reference_test_ndcg@10": ref["test"]["ndcg@10"],
        "fidelity_ndcg@10": candidate["test"]["ndcg@10"] / ref["test"]["ndcg@10"],
        "ease_fraction_val_ndcg@10": candidate["val"]["ndcg@10"] / base["ease"]["val"]["ndcg@10"],
    }
    report = {"summary": summary, "candidate": candidate, **base,
              "reference": {k: v for k, v in ref.items() if k != "support"}}
    write_json(Path(out_path), report, atomic=True)
    return report
