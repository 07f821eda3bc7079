"""Distill-CF on a real data set (ML-1M): speed per step and fidelity of ∞-AE fitted on the summary.

    .venv/bin/python -m bench.distill_cf \
        --data ../shared/data/ml-1m/interactions.parquet --budget 500

Ingests the file (keeping its split), distills ``--budget`` synthetic users (default
hyper-parameters, run to the early stop unless ``--steps`` is smaller), fits ∞-AE on the summary
(λ from the summary grid by validation HR@100) and evaluates it on test; beside it, ∞-AE on all
users (full-data grid) and on ``--budget`` random users. ``--profile`` also times the parts of one
step. Progress goes to stderr; the last stdout line is one JSON object:

    {"budget", "steps_run", "best_step", "seconds_per_step", "peak_rss_mb", "test": {...},
     "full_test": {...}, "random_test": {...}, "fidelity_ndcg@10": test / full, ...}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import jax_device, peak_rss_mb


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _time_fn(fn: Any, *args: Any, repeats: int = 3) -> dict[str, float]:
    """Min wall and CPU seconds of ``fn(*args)`` over ``repeats`` runs (after one warm-up)."""
    import jax

    jax.block_until_ready(fn(*args))
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return {"wall_s": round(min(walls), 4), "cpu_s": round(min(cpus), 4)}


def profile_step(dataset: Any, config: Any) -> dict[str, dict[str, float]]:
    """Wall/CPU seconds of the parts of one Distill-CF step (all users as targets)."""
    import jax
    import jax.numpy as jnp

    from models.distill_cf import (adam_init, cholesky_solve, compiler_options, draw_seeds,
                                   make_loss_fn, make_multi_gumbel_fn, make_step_fn, ntk_fn,
                                   single_threaded_blas, softmax_cross_entropy)
    from models.samplers import random_users

    train = dataset.train
    n_items = train.shape[1]
    counts = np.diff(train.indptr).astype(np.float32)
    targets = jnp.asarray(train.toarray().astype(np.float32))
    targets_sq = jnp.asarray(counts)
    x_raw = jnp.asarray(random_users(train, config.budget, config.seed))
    seeds = draw_seeds(jax.random.key(0), config.samples, config.noise)
    rng = np.random.default_rng(0)
    cotangent = jnp.asarray(rng.standard_normal(x_raw.shape).astype(np.float32))
    opts = compiler_options()
    multi_gumbel_fn = make_multi_gumbel_fn(config.tau, config.noise)
    _, sample_fn = make_loss_fn(n_items, train.nnz / train.shape[0], config)
    support = sample_fn(x_raw, seeds)

    def kernel_loss(sup: Any, lam: Any) -> Any:
        sq = jnp.sum(sup * sup, axis=1)
        k_ss = ntk_fn(sup @ sup.T, sq, sq, n_items, config.kernel)
        k_ts = ntk_fn(targets @ sup.T, targets_sq, sq, n_items, config.kernel)
        lam_scaled = jnp.abs(lam) * jnp.trace(k_ss) / sup.shape[0]
        alpha = cholesky_solve(k_ss + lam_scaled * jnp.eye(sup.shape[0], dtype=sup.dtype), sup)
        return softmax_cross_entropy(k_ts @ alpha, targets, targets_sq)

    def gumbel_vjp(x: Any, s: Any, g: Any) -> Any:
        return jax.vjp(lambda v: multi_gumbel_fn(v, s), x)[1](g)[0]

    step_fn, _ = make_step_fn(n_items, train.nnz / train.shape[0], config)
    state = adam_init(x_raw)
    lam = jnp.float32(1.0)
    parts = {
        "gumbel_forward": (jax.jit(multi_gumbel_fn, compiler_options=opts), (x_raw, seeds)),
        "gumbel_forward_backward": (jax.jit(gumbel_vjp, compiler_options=opts),
                                    (x_raw, seeds, cotangent)),
        "kernel_loss_forward": (jax.jit(kernel_loss, compiler_options=opts), (support, lam)),
        "kernel_loss_forward_backward": (jax.jit(jax.grad(kernel_loss), compiler_options=opts),
                                         (support, lam)),
        "full_step": (step_fn, (state, jax.random.key(1), lam, targets, targets_sq)),
    }
    if config.noise == "hash":  # the same step with jax.random's threefry noise, for comparison
        import dataclasses

        jax_step_fn, _ = make_step_fn(n_items, train.nnz / train.shape[0],
                                      dataclasses.replace(config, noise="jax"))
        parts["full_step_threefry_noise"] = (jax_step_fn, (state, jax.random.key(1), lam, targets,
                                                           targets_sq))
    out = {}
    with single_threaded_blas():
        for name, (fn, args) in parts.items():
            out[name] = _time_fn(fn, *args)
            say(f"profile {name}: {out[name]}")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="interactions file (Parquet/CSV/ratings.dat)")
    parser.add_argument("--budget", type=int, default=500, help="synthetic users (μ)")
    parser.add_argument("--steps", type=int, default=500,
                        help="maximum Distill-CF steps (early stop may end sooner)")
    parser.add_argument("--samples", type=int, default=200,
                        help="Gumbel draws per synthetic user (S)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", default="hash", choices=("hash", "jax"),
                        help="Gumbel noise generator")
    parser.add_argument("--profile", action="store_true", help="also time the parts of one step")
    parser.add_argument("--keep", type=Path, default=None, help="copy the summary and its log here")
    args = parser.parse_args(argv)

    import jax

    from models.distill_cf import DistillConfig
    from models.infinite_ae import FULL_DATA_LAMBDAS, SUMMARY_LAMBDAS, evaluate, fit_select
    from models.samplers import random_users
    from tasks.data import load_dataset
    from tasks.distill import distill_dataset
    from tasks.ingest import ingest
    from tasks.summary import read_summary

    load_start = os.getloadavg()
    out: dict[str, Any] = {"budget": args.budget}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        ingest(args.data, tmp_path / "processed")
        dataset = load_dataset(tmp_path / "processed")
        say(f"ingest: {dataset.n_users} users × {dataset.n_items} items "
            f"in {time.perf_counter() - t0:.1f}s")
        config = DistillConfig(budget=args.budget, samples=args.samples, max_steps=args.steps,
                               seed=args.seed, noise=args.noise)
        if args.profile:
            out["profile"] = profile_step(dataset, config)

        def progress(info: dict[str, Any]) -> None:
            if info["evaluated"] or info["step"] % 10 == 0:
                loss = "-" if info["loss"] is None else f"{info['loss']:.3f}"
                hr = info.get("val_hr@100")
                say(f"step {info['step']:4d} loss {loss} {info['seconds']:.2f}s/step"
                    + (f"  val hr@100 {hr:.2f} (λ={info['lambda']:g}, "
                       f"best step {info['best_step']})" if hr is not None else ""))

        t0 = time.perf_counter()
        report = distill_dataset(tmp_path / "processed", tmp_path / "summary.parquet",
                                 budget=args.budget, seed=args.seed, steps=args.steps,
                                 samples=args.samples, noise=args.noise, progress=False,
                                 on_step=progress)
        distill_seconds = time.perf_counter() - t0
        say(f"distill: {report['steps_run']} steps, best step {report['best_step']}, "
            f"{report['seconds_per_step']:.3f}s/step (median), {distill_seconds:.0f}s in all")
        summary, _, _ = read_summary(tmp_path / "summary.parquet")
        with open(report["log_path"]) as fh:
            step_seconds = [row["seconds"] for row in map(json.loads, fh) if row["step"] >= 2]
        if args.keep is not None:
            import shutil

            args.keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / "summary.parquet", args.keep / "summary.parquet")
            shutil.copy(report["log_path"], args.keep / "summary.log.jsonl")

    val, test = dataset.val_set(), dataset.test_set()

    def fit_and_test(name: str, support: Any, lambdas: Any, **kw: Any) -> dict[str, float]:
        t = time.perf_counter()
        model, _ = fit_select(support, val, lambdas, **kw)
        metrics = evaluate(model, test)
        say(f"{name}: λ={model.lam:g} test ndcg@10 {metrics['ndcg@10']:.2f} "
            f"hr@10 {metrics['hr@10']:.2f} auc {metrics['auc']:.4f} "
            f"({time.perf_counter() - t:.0f}s)")
        out[f"{name}_lambda"] = model.lam
        return metrics

    out["test"] = fit_and_test("summary", summary, SUMMARY_LAMBDAS)
    out["full_test"] = fit_and_test("full", dataset.train.toarray().astype(np.float32),
                                    FULL_DATA_LAMBDAS, support_is_val_context=True)
    out["random_test"] = fit_and_test("random", random_users(dataset.train, args.budget, args.seed),
                                      SUMMARY_LAMBDAS)
    out.update({
        "steps_run": report["steps_run"],
        "best_step": report["best_step"],
        "seconds_per_step": round(report["seconds_per_step"], 4),  # median, first step excluded
        # the machine is shared: the fastest decile shows the steps that ran with both cores free
        "seconds_per_step_p10": round(float(np.percentile(step_seconds, 10)), 4),
        "seconds_per_step_min": round(float(np.min(step_seconds)), 4),
        "distill_seconds": round(distill_seconds, 1),
        "summary_val": report["val"],
        "summary_nnz": report["nnz"],
        "fidelity_ndcg@10": out["test"]["ndcg@10"] / out["full_test"]["ndcg@10"],
        "random_fidelity_ndcg@10": out["random_test"]["ndcg@10"] / out["full_test"]["ndcg@10"],
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "device": jax_device(),
        "device": f"{jax.default_backend()} ({os.cpu_count()} cores)",
        "loadavg_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
    })
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
