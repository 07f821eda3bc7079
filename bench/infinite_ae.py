"""∞-AE on a real data set (ML-1M), timed against the bare linear algebra of one λ.

    .venv/bin/python -m bench.infinite_ae --data ../shared/data/ml-1m/interactions.parquet

Ingests the file (keeping its split), fits ∞-AE on all train users with λ chosen on validation
``--metric`` (default HR@100, the paper's rule: passed explicitly, whatever the library default),
evaluates on test, fits a tuned EASE beside it (λ by the same metric), and measures in the same process the
floor: NumPy float32 Gram X·Xᵀ + SciPy Cholesky + solve with every item as a right-hand side +
the predict matmul. Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import jax_device, peak_rss_mb


def floor_seconds(train) -> float:
    """Bare linear algebra of one λ on the train matrix (float32)."""
    import scipy.linalg as sla

    x = train.toarray().astype(np.float32)
    t0 = time.perf_counter()
    gram = x @ x.T
    gram[np.diag_indices_from(gram)] += np.float32(np.trace(gram) / len(gram))
    factor = sla.cho_factor(gram, lower=True, overwrite_a=True, check_finite=False)
    alpha = sla.cho_solve(factor, x, check_finite=False)
    _ = gram @ alpha  # the predict matmul (same n × n × m shape)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="interactions file (Parquet/CSV/ratings.dat)")
    parser.add_argument("--lambdas", default="0,1,5,20,50,100", help="∞-AE λ grid")
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--no-ease", action="store_true", help="skip the EASE baseline")
    parser.add_argument("--metric", default="hr@100",
                        help="validation metric that picks λ (∞-AE and EASE); the paper: hr@100")
    args = parser.parse_args(argv)

    from models.baselines import EASE_LAMBDAS, fit_ease_select
    from models.infinite_ae import evaluate, evaluate_score_batches, fit_select, kernel_matrix, support_gram
    from models.kernels import NTKConfig
    from tasks.data import load_dataset
    from tasks.ingest import ingest

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    lambdas = [float(v) for v in args.lambdas.split(",")]
    config = NTKConfig(depth=args.depth)
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ingest(args.data, Path(tmp) / "processed")
        dataset = load_dataset(Path(tmp) / "processed")
        seconds["ingest"] = time.perf_counter() - t0
    say(f"ingest: {dataset.n_users} users × {dataset.n_items} items in {seconds['ingest']:.2f}s")

    t0 = time.perf_counter()
    support = dataset.train.toarray()
    gram = support_gram(support)  # kept: the test users are the support users (train + val rows)
    kernel = kernel_matrix(support, config, gram=gram)
    seconds["kernel"] = time.perf_counter() - t0
    say(f"kernel: {seconds['kernel']:.2f}s")

    t0 = time.perf_counter()
    # λ is chosen on validation --metric: the λ not kept are ranked for that alone
    model, path = fit_select(
        support, dataset.val_set(), lambdas, config, support_is_val_context=True, kernel=kernel,
        select_metric=args.metric, path_metrics=(args.metric,),
        on_lambda=lambda r: say(f"  λ={r.lam:g}: val {args.metric}={r.val[args.metric]:.4f} "
                                f"({time.perf_counter() - t0:.1f}s)"),
    )
    del kernel
    seconds["fit"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    test = evaluate(model, dataset.test_set(), support_gram=gram)
    del gram
    seconds["evaluate"] = time.perf_counter() - t0
    seconds["total"] = sum(seconds.values())
    say(f"∞-AE λ={model.lam:g}: test {json.dumps({k: round(v, 4) for k, v in test.items()})}")

    ease_test = None
    if not args.no_ease:
        t0 = time.perf_counter()
        ease, ease_path = fit_ease_select(dataset.train, dataset.val_set(), EASE_LAMBDAS,
                                          select_metric=args.metric)
        ease_test = evaluate_score_batches(ease.iter_scores(dataset.test_set().context), dataset.test_set())
        say(f"EASE λ={ease.lam:g}: test {json.dumps({k: round(v, 4) for k, v in ease_test.items()})}"
            f" ({time.perf_counter() - t0:.1f}s)")

    floor = floor_seconds(dataset.train)
    say(f"floor (one λ of bare linear algebra): {floor:.2f}s; total/floor = {seconds['total'] / floor:.2f}")
    result = {
        "select_metric": args.metric,
        "users": dataset.n_users,
        "items": dataset.n_items,
        "lambda": model.lam,
        "test": test,
        "val": next(r.val for r in path if r.lam == model.lam),
        "ease_lambda": None if ease_test is None else ease.lam,
        "ease_test": ease_test,
        "seconds": seconds,
        "floor_seconds": floor,
        "peak_rss_mb": peak_rss_mb(),
        "device": jax_device(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
