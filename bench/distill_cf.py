"""Distill-CF on a data set: speed per step, and ∞-AE on the summary against random users and all users.

    .venv/bin/python -m bench.distill_cf \
        --data ../shared/data/ml-1m/interactions.parquet --budget 500 --metric hr@100

``--data``: an interactions file (ingested here into a temporary directory: a ``split`` column is
kept, else the paper's split is drawn) or an ``infrec ingest`` output directory. Distills
``--budget`` synthetic users (:func:`models.distill_cf.distill`, run to its early stop or
``--steps``), with one selection metric (``--metric``, passed explicitly) choosing every λ, the
best step and the early stop. Then, each λ chosen on validation by the same metric, fits ∞-AE on
the summary (summary grid), on the ``--budget`` random users Distill-CF started from (same seed,
summary grid) and on all users (full-data grid), and evaluates them on test. ``--profile`` also
times the parts of one step. Progress goes to stderr; the last stdout line is one JSON object:

    {"data", "select_metric", "budget", "config", "steps_run", "best_step", "seconds_per_step",
     "distill_seconds", "eval_seconds", "candidate": {"lambda", "val", "test"}, "random": {...},
     "full": {...}, "fidelity": candidate / full test <metric>, "random_fidelity", "fidelity_ndcg@10",
     "random_fidelity_ndcg@10", "candidate_minus_random_ndcg@10", "peak_rss_mb", "device",
     "loadavg_start_end"}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import jax_device, peak_rss_mb, say


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
    """Wall/CPU seconds of the parts of one Distill-CF step, on the step's own targets: a batch
    of ``config.target_batch`` users (seeded) when set and smaller than the users with train rows,
    else all of them. The targets are arguments of every timed function (never constants)."""
    import jax
    import jax.numpy as jnp

    from models.distill_cf import (adam_init, cholesky_solve, compiler_options, draw_seeds,
                                   make_loss_fn, make_multi_gumbel_fn, make_step_fn, ntk_fn,
                                   single_threaded_blas, softmax_cross_entropy)
    from models.samplers import random_users, rows_of

    train = dataset.train
    n_items = train.shape[1]
    counts = np.diff(train.indptr).astype(np.float32)
    active = np.flatnonzero(counts > 0)
    users = active
    if config.target_batch and config.target_batch < len(active):
        users = np.sort(np.random.default_rng([config.seed, 2]).choice(
            active, size=config.target_batch, replace=False))
    targets = jnp.asarray(rows_of(train, users))
    targets_sq = jnp.asarray(counts[users])
    x_raw = jnp.asarray(random_users(train, config.budget, config.seed))
    seeds = draw_seeds(jax.random.key(0), config.samples, config.noise)
    rng = np.random.default_rng(0)
    cotangent = jnp.asarray(rng.standard_normal(x_raw.shape).astype(np.float32))
    opts = compiler_options()
    multi_gumbel_fn = make_multi_gumbel_fn(config.tau, config.noise)
    _, sample_fn = make_loss_fn(n_items, train.nnz / train.shape[0], config)
    support = sample_fn(x_raw, seeds)

    # the targets are arguments, never closed over: a closure would make the whole users × items
    # matrix a constant of the compiled program (34 GB at 480k users)
    def kernel_loss(sup: Any, lam: Any, tgt: Any, tgt_sq: Any) -> Any:
        sq = jnp.sum(sup * sup, axis=1)
        k_ss = ntk_fn(sup @ sup.T, sq, sq, n_items, config.kernel)
        k_ts = ntk_fn(tgt @ sup.T, tgt_sq, sq, n_items, config.kernel)
        lam_scaled = jnp.abs(lam) * jnp.trace(k_ss) / sup.shape[0]
        alpha = cholesky_solve(k_ss + lam_scaled * jnp.eye(sup.shape[0], dtype=sup.dtype), sup)
        return softmax_cross_entropy(k_ts @ alpha, tgt, tgt_sq)

    def gumbel_vjp(x: Any, s: Any, g: Any) -> Any:
        return jax.vjp(lambda v: multi_gumbel_fn(v, s), x)[1](g)[0]

    step_fn, _ = make_step_fn(n_items, train.nnz / train.shape[0], config)
    state = adam_init(x_raw)
    lam = jnp.float32(1.0)
    parts = {
        "gumbel_forward": (jax.jit(multi_gumbel_fn, compiler_options=opts), (x_raw, seeds)),
        "gumbel_forward_backward": (jax.jit(gumbel_vjp, compiler_options=opts),
                                    (x_raw, seeds, cotangent)),
        "kernel_loss_forward": (jax.jit(kernel_loss, compiler_options=opts),
                                (support, lam, targets, targets_sq)),
        "kernel_loss_forward_backward": (jax.jit(jax.grad(kernel_loss), compiler_options=opts),
                                         (support, lam, targets, targets_sq)),
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


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def load_any(path: Path, tmp: Path) -> Any:
    """An ``infrec ingest`` output directory as is, or a raw interactions file ingested into ``tmp``."""
    from tasks.data import load_dataset
    from tasks.ingest import ingest

    if path.is_dir():
        return load_dataset(path)
    ingest(path, tmp / "processed")
    return load_dataset(tmp / "processed")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from models.distill_cf import DEFAULT_EVAL_STEPS, DistillConfig
    from models.infinite_ae import FULL_DATA_LAMBDAS, SUMMARY_LAMBDAS
    from models.metrics import METRIC_KEYS

    defaults = DistillConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path,
                        help="interactions file (Parquet/CSV/TSV/ratings.dat) or ingested directory")
    parser.add_argument("--metric", default="hr@100", choices=METRIC_KEYS,
                        help="validation metric that picks every λ, the best step and the early "
                             "stop (the paper: hr@100)")
    parser.add_argument("--budget", type=int, default=500, help="synthetic users (μ)")
    parser.add_argument("--steps", type=int, default=defaults.max_steps,
                        help="maximum Distill-CF steps (early stop may end sooner)")
    parser.add_argument("--samples", type=int, default=defaults.samples,
                        help="Gumbel draws per synthetic user (S)")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--tau", type=float, default=defaults.tau)
    parser.add_argument("--reg", type=float, default=defaults.reg)
    parser.add_argument("--patience", type=int, default=defaults.patience)
    parser.add_argument("--min-steps", type=int, default=defaults.min_steps,
                        help="no early stop before this step")
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--eval-steps", default=",".join(map(str, DEFAULT_EVAL_STEPS)),
                        help="extra evaluation steps, comma-separated ('' for none)")
    parser.add_argument("--target-batch", type=int, default=None,
                        help="real users per step (default: all)")
    parser.add_argument("--lambdas", default=",".join(map(str, SUMMARY_LAMBDAS)),
                        help="λ grid of summary fits (Distill-CF and random users)")
    parser.add_argument("--full-lambdas", default=",".join(map(str, FULL_DATA_LAMBDAS)),
                        help="λ grid of the fit on all users")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", default="hash", choices=("hash", "jax"),
                        help="Gumbel noise generator")
    parser.add_argument("--no-full", action="store_true", help="skip ∞-AE on all users")
    parser.add_argument("--profile", action="store_true", help="also time the parts of one step")
    parser.add_argument("--eval-max-users", type=int, default=None,
                        help="in-loop checks on a seeded sample of this many validation users "
                             "(the pipeline's distill.eval_max_users; default: every user)")
    parser.add_argument("--max-users", type=int, default=None,
                        help="final test figures on a seeded sample of this many test users "
                             "(the pipeline's evaluate.max_users; default: every user)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="write the summary (.npy) and the step log (.jsonl) here")
    args = parser.parse_args(argv)

    import jax

    from models.distill_cf import distill
    from models.infinite_ae import evaluate, fit_select, support_gram
    from models.samplers import random_users

    load_start = os.getloadavg()
    metric = args.metric
    out: dict[str, Any] = {"data": str(args.data), "select_metric": metric, "budget": args.budget}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        dataset = load_any(args.data, Path(tmp))
        say(f"data: {dataset.n_users} users × {dataset.n_items} items, "
            f"{dataset.train.nnz} train interactions ({time.perf_counter() - t0:.1f}s)")
    config = DistillConfig(budget=args.budget, samples=args.samples, max_steps=args.steps,
                           lr=args.lr, tau=args.tau, reg=args.reg, patience=args.patience,
                           min_steps=args.min_steps,
                           eval_every=args.eval_every, eval_steps=_ints(args.eval_steps),
                           lambdas=_floats(args.lambdas), select_metric=metric,
                           target_batch=args.target_batch, seed=args.seed, noise=args.noise)
    out["config"] = {k: v for k, v in dataclasses.asdict(config).items() if k != "kernel"}
    if args.profile:
        out["profile"] = profile_step(dataset, config)
    val, test = dataset.val_set(args.eval_max_users), dataset.test_set(args.max_users)

    log: list[dict[str, Any]] = []
    t_start = time.perf_counter()

    def progress(info: dict[str, Any]) -> None:
        row = {k: info.get(k) for k in ("step", "loss", "seconds", "evaluated", "lambda",
                                        "best_step", "eval_seconds")}
        row["elapsed"] = time.perf_counter() - t_start
        if info["evaluated"]:
            row["val"] = info["val"]
            row["lambda_path"] = info["lambda_path"]
        log.append(row)
        if info["evaluated"] or info["step"] % 10 == 0:
            loss = "-" if info["loss"] is None else f"{info['loss']:.3f}"
            value = info.get(f"val_{metric}")
            say(f"step {info['step']:4d} loss {loss} {info['seconds']:.2f}s/step "
                f"{row['elapsed']:6.0f}s" + (
                    f"  val {metric} {value:.2f} ndcg@10 {info['val']['ndcg@10']:.2f} "
                    f"hr@100 {info['val']['hr@100']:.2f} (λ={info['lambda']:g}, "
                    f"{info['eval_seconds']:.1f}s; best step {info['best_step']})"
                    if value is not None else ""))

    t0 = time.perf_counter()
    result = distill(dataset.train, val, config, on_step=progress)
    distill_seconds = time.perf_counter() - t0
    eval_seconds = sum(r["eval_seconds"] or 0.0 for r in log if r["evaluated"])
    say(f"distill: {result.steps_run} steps, best step {result.best_step}, "
        f"{result.seconds_per_step:.3f}s/step (median), {eval_seconds:.0f}s of evaluations, "
        f"{distill_seconds:.0f}s in all")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        np.save(args.keep / "summary.npy", result.summary)
        with open(args.keep / "summary.log.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in log)

    def fit_and_test(name: str, support: Any, lambdas: Any, **kw: Any) -> dict[str, Any]:
        t = time.perf_counter()
        model, path = fit_select(support, val, lambdas, select_metric=metric,
                                 path_metrics=(metric,), **kw)
        best = next(p for p in path if p.lam == model.lam)
        gram = support_gram(support) if kw.get("support_is_val_context") else None
        metrics = evaluate(model, test, support_gram=gram)
        say(f"{name}: λ={model.lam:g} val {metric} {best.val[metric]:.2f} test ndcg@10 "
            f"{metrics['ndcg@10']:.2f} hr@10 {metrics['hr@10']:.2f} hr@100 {metrics['hr@100']:.2f} "
            f"auc {metrics['auc']:.4f} ({time.perf_counter() - t:.0f}s)")
        return {"lambda": model.lam, "val": best.val, "test": metrics,
                "lambda_path": [[p.lam, p.val[metric]] for p in path]}

    summary_grid = config.lambdas
    out["candidate"] = fit_and_test("candidate", result.summary, summary_grid)
    out["random"] = fit_and_test("random", random_users(dataset.train, args.budget, args.seed),
                                 summary_grid)
    if not args.no_full:
        out["full"] = fit_and_test("full", dataset.train.toarray().astype(np.float32),
                                   _floats(args.full_lambdas), support_is_val_context=True)
    step_seconds = [r["seconds"] for r in log if r["step"] >= 2]
    out.update({
        "steps_run": result.steps_run,
        "best_step": result.best_step,
        "best_lambda": result.best_lambda,
        "init_val": result.init_val,
        "best_val": result.best_val,
        "seconds_per_step": round(result.seconds_per_step, 4),  # median, first step excluded
        # the machine is shared: the fastest decile shows the steps that ran with both cores free
        "seconds_per_step_p10": round(float(np.percentile(step_seconds, 10)), 4) if step_seconds else None,
        "distill_seconds": round(distill_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "evaluations": sum(r["evaluated"] for r in log),
        "summary_nnz": int((result.summary > 1e-6).sum()),
        "candidate_minus_random_ndcg@10": out["candidate"]["test"]["ndcg@10"]
        - out["random"]["test"]["ndcg@10"],
    })
    if "full" in out:
        full = out["full"]["test"]
        out.update({
            "fidelity": out["candidate"]["test"][metric] / full[metric],
            "random_fidelity": out["random"]["test"][metric] / full[metric],
            "fidelity_ndcg@10": out["candidate"]["test"]["ndcg@10"] / full["ndcg@10"],
            "random_fidelity_ndcg@10": out["random"]["test"]["ndcg@10"] / full["ndcg@10"],
        })
    out.update({
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "device": f"{jax_device()} ({os.cpu_count()} cores)",
        "loadavg_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
    })
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
