"""The accelerator benchmark in one script: ML-1M ∞-AE and Distill-CF, and the model work of the
fit, distill and evaluate stages on a generated Netflix-shaped log, with ranking on the device.

    python -m bench.gpu --ml1m ../shared/data/ml-1m/interactions.parquet          # everything
    python -m bench.gpu --only netflix --rows 200000 --users 5000 --items 2000     # small, on CPU

Runs with JAX, NumPy, SciPy and pyarrow alone (no Polars, Prefect, MLflow or DVC): the Parquet
file is read with pyarrow and re-indexed as ``infrec ingest`` does for a file with a ``split``
column (users and items by sorted raw id, duplicates collapsed), the Netflix-shaped log is
generated in NumPy (deterministic for ``--seed``), and only :mod:`models` is imported.

Phases (each: wall seconds, and the device's memory in use and peak after it where the backend
reports it, with the process's peak RSS):

* ``ml1m_infae`` — ∞-AE on all 6,040 users: kernel, λ grid (validation ``--metric``, scores
  ``X − λ̃α`` on the device), test; run ``--repeat`` times in the process (the first includes
  compilation unless ``JAX_COMPILATION_CACHE_DIR``/``--cache-dir`` holds it; the next ones are
  warm). Test metrics beside the CPU figures (33.39 / 31.91 with ``hr@100``);
* ``ml1m_distill`` — Distill-CF (budget 500, the shipped ``params.yaml`` settings: target batch
  3,072, evaluations at 25, 50, …, 200 and every 40, min 200 steps, patience 40) with every
  evaluation on the device, then ∞-AE on the summary (summary grid) on test and its fidelity to
  ``ml1m_infae``'s test figure;
* ``netflix`` — a log of ``--rows`` rows (default 100M; ``--users`` 480,189 × ``--items`` 17,770)
  split as the paper does; then the stages' model work with their shipped settings: distill
  (Distill-CF, 500 users, in-loop checks on a 10,000-user validation sample), fit (∞-AE on the
  summary, λ on the 20,000-user validation sample, test on the 20,000-user test sample), evaluate
  (PopRec, and the reference ∞-AE on a 20,000-user support, same samples), and ``rank_all``: the
  top 100 unseen items of every user from train + validation by the reference model.

Progress goes to stderr; the last stdout line is one JSON object with a key per phase.

On a GPU machine (the repository copied there, ML-1M beside it at a git-ignored path such as
``data/ml1m.parquet``), cold then warm, the second run reading the compiled programs from the
cache the first one wrote::

    export JAX_COMPILATION_CACHE_DIR=/tmp/infrec-jax-cache
    python3 -m bench.gpu --ml1m data/ml1m.parquet > cold.json 2> cold.log
    python3 -m bench.gpu --ml1m data/ml1m.parquet --only ml1m-infae,ml1m-distill \\
        > warm.json 2> warm.log
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp

from bench.common import peak_rss_mb, say

# the shipped params.yaml values these phases use (read here without PyYAML, which the GPU
# machine may lack): distill.*, evaluate.max_users / reference_max_users, fit grids
SHIPPED = {
    "budget": 500, "samples": 200, "tau": 10.0, "lr": 0.04, "reg": 1e-3, "steps": 500,
    "patience": 40, "min_steps": 200, "eval_every": 40, "target_batch": 3072,
    "eval_max_users": 10_000, "max_users": 20_000, "reference_max_users": 20_000,
}
AUC_NEGATIVES, AUC_SEED = 50, 0  # as tasks.data
NETFLIX = {"users": 480_189, "items": 17_770, "rows": 100_000_000}


# -- data without Polars -----------------------------------------------------------------------
@dataclass
class SplitData:
    """Train / validation / test as binary CSR (users × items): :class:`tasks.data.Dataset`'s
    evaluation sets, built from :mod:`models.metrics` alone."""

    train: sp.csr_matrix
    val: sp.csr_matrix
    test: sp.csr_matrix

    @property
    def n_users(self) -> int:
        return self.train.shape[0]

    @property
    def n_items(self) -> int:
        return self.train.shape[1]

    @cached_property
    def item_weights(self) -> np.ndarray:
        from models.metrics import propensity_weights

        return propensity_weights(np.asarray(self.train.sum(axis=0)).ravel(), int(self.train.nnz))

    @cached_property
    def negatives(self) -> np.ndarray:
        from models.metrics import sample_negatives

        return sample_negatives(self.train + self.test, AUC_NEGATIVES, AUC_SEED)

    def _set(self, targets: sp.csr_matrix, context: sp.csr_matrix, max_users: int | None,
             seed: int) -> Any:
        from models.infinite_ae import EvalSet
        from models.metrics import sample_negatives, sample_users

        rows = sample_users(targets, max_users, seed)
        context = context.tocsr()
        context.data[:] = 1.0
        if rows is None:
            return EvalSet(context=context, targets=targets, weights=self.item_weights,
                           negatives=self.negatives)
        negatives = sample_negatives((self.train[rows] + self.test[rows]).tocsr(), AUC_NEGATIVES,
                                     AUC_SEED)
        return EvalSet(context=context[rows], targets=targets[rows], weights=self.item_weights,
                       negatives=negatives, rows=rows,
                       population=int((np.diff(targets.indptr) > 0).sum()))

    def val_set(self, max_users: int | None = None, seed: int = 0) -> Any:
        return self._set(self.val, self.train.copy(), max_users, seed)

    def test_set(self, max_users: int | None = None, seed: int = 0) -> Any:
        return self._set(self.test, self.train + self.val, max_users, seed)


def _matrix(u: np.ndarray, i: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    mat = sp.csr_matrix((np.ones(len(u), dtype=np.float32), (u, i)), shape=shape)
    mat.sum_duplicates()
    mat.data[:] = 1.0
    return mat


def load_parquet(path: Path) -> SplitData:
    """An interactions Parquet file with ``user_id``, ``item_id``, ``split`` columns, read with
    pyarrow and indexed as ``infrec ingest`` does (sorted raw ids, duplicates collapsed)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["user_id", "item_id", "split"])
    raw_u = table.column("user_id").to_numpy()
    raw_i = table.column("item_id").to_numpy()
    split = table.column("split").combine_chunks().dictionary_encode()
    names = [str(v) for v in split.dictionary.to_pylist()]
    codes = split.indices.to_numpy(zero_copy_only=False)
    _, u = np.unique(raw_u, return_inverse=True)
    _, i = np.unique(raw_i, return_inverse=True)
    shape = (int(u.max()) + 1, int(i.max()) + 1)
    by_name = {name: codes == names.index(name) for name in ("train", "val", "test")}
    return SplitData(*(_matrix(u[m], i[m], shape) for m in by_name.values()))


def generate(n_users: int, n_items: int, rows: int, seed: int = 0, groups: int = 50,
             zipf: float = 0.9) -> SplitData:
    """A Netflix-shaped log, deterministic for ``seed`` (the shape of :func:`bench.scale.write_csv`:
    log-normal user activity, Zipf item popularity, half of each user's picks from a taste group's
    own order), de-duplicated, users with < 3 items dropped, then the paper's split: per user one
    random interaction to test, of the rest the first 80% (random order) train, 10% val, the
    remainder test."""
    rng = np.random.default_rng(seed)
    activity = rng.lognormal(0.0, 1.0, n_users)
    counts = rng.multinomial(rows, activity / activity.sum())
    users = np.repeat(np.arange(n_users, dtype=np.int64), counts)
    cdf = np.cumsum(np.arange(1, n_items + 1, dtype=np.float64) ** -float(zipf))
    ranks = np.minimum(np.searchsorted(cdf / cdf[-1], rng.random(rows), side="right"), n_items - 1)
    perms = np.argsort(rng.random((groups + 1, n_items)), axis=1)
    group = rng.integers(0, groups, n_users)
    table = np.where(rng.random(rows) < 0.5, 1 + group[users], 0)
    items = perms[table, ranks]
    del table, ranks
    keys = np.unique(users * n_items + items)  # sorted by (user, item), duplicates collapsed
    del users, items
    u, i = keys // n_items, keys % n_items
    del keys
    per_user = np.bincount(u, minlength=n_users)
    keep = per_user[u] >= 3
    u, i = u[keep], i[keep]
    # each user's rows in a random order: sort by (user, random key)
    order = np.argsort((u << 40) | rng.integers(0, 1 << 40, len(u)), kind="stable")
    u, i = u[order], i[order]
    n = np.bincount(u, minlength=n_users)
    start = np.concatenate([[0], np.cumsum(n)[:-1]])
    pos = np.arange(len(u)) - start[u]
    cnt = n[u]
    code = np.full(len(u), 2, dtype=np.int8)
    code[(pos > 0) & (10 * pos < 9 * (cnt - 1))] = 1
    code[(pos > 0) & (10 * pos < 8 * (cnt - 1))] = 0
    # contiguous users over the kept rows, every item kept (the catalogue's width)
    present = np.flatnonzero(n > 0)
    index = np.full(n_users, -1, dtype=np.int64)
    index[present] = np.arange(len(present))
    u = index[u]
    shape = (len(present), n_items)
    return SplitData(*(_matrix(u[code == c], i[code == c], shape) for c in (0, 1, 2)))


# -- timing helpers --------------------------------------------------------------------------------
def memory() -> dict[str, Any]:
    from models.jax_infae import device_memory

    out: dict[str, Any] = {k: round(v / 2**20, 1) for k, v in device_memory().items()}
    out = {f"device_{k.replace('bytes', 'mb')}": v for k, v in out.items()}
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return out


class Phases:
    """Wall seconds and memory per phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.memory: dict[str, Any] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        import jax

        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        self.seconds[name] = round(time.perf_counter() - t0, 3)
        self.memory[name] = memory()
        say(f"  {name}: {self.seconds[name]:.2f}s {json.dumps(self.memory[name])}")
        return out

    def report(self) -> dict[str, Any]:
        return {"seconds": {**self.seconds, "total": round(sum(self.seconds.values()), 3)},
                "memory": self.memory}


def _round(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in metrics.items()}


# -- phases -----------------------------------------------------------------------------------
def infae_all_users(data: SplitData, metric: str, batch: int) -> dict[str, Any]:
    """∞-AE on every train user: kernel, λ grid on validation, test — all on the device."""
    from models.infinite_ae import FULL_DATA_LAMBDAS, _dense32
    from models.jax_infae import fit_select_device, kernel_matrix_device

    phases = Phases()
    val, test = data.val_set(), data.test_set()  # fresh sets: their device batches are not cached
    support = _dense32(data.train)
    kernel = phases.run("kernel", lambda: kernel_matrix_device(support))
    model, path = phases.run("fit", lambda: fit_select_device(
        support, val, FULL_DATA_LAMBDAS, support_is_val_context=True, select_metric=metric,
        path_metrics=(metric,), batch=batch, kernel=kernel))
    del kernel
    test_metrics = phases.run("evaluate", lambda: model.evaluate(test, batch=batch))
    best = next(p for p in path if p.lam == model.lam)
    return {**phases.report(), "lambda": model.lam, "val": _round(best.val),
            "test": _round(test_metrics),
            "lambda_path": [[p.lam, round(p.val.get(metric, float("nan")), 4)] for p in path]}


def distill_phase(data: SplitData, metric: str, batch: int, args: argparse.Namespace,
                  phases: Phases, val: Any) -> tuple[Any, dict[str, Any]]:
    from models.distill_cf import DistillConfig, distill
    from models.jax_infae import make_validator

    config = DistillConfig(budget=min(args.budget, int((np.diff(data.train.indptr) > 0).sum())),
                           samples=args.samples, tau=SHIPPED["tau"], lr=SHIPPED["lr"],
                           reg=SHIPPED["reg"], max_steps=args.distill_steps,
                           patience=SHIPPED["patience"], min_steps=SHIPPED["min_steps"],
                           eval_every=SHIPPED["eval_every"], select_metric=metric,
                           target_batch=SHIPPED["target_batch"], seed=0)
    steps: list[float] = []
    evals: list[float] = []

    def on_step(info: dict[str, Any]) -> None:
        if info["step"] > 0:
            steps.append(info["seconds"])
        if info["evaluated"]:
            evals.append(info["eval_seconds"])
            say(f"    step {info['step']}: val {metric} {info[f'val_{metric}']:.2f} "
                f"(λ={info['lambda']:g}, check {info['eval_seconds']:.2f}s; best step "
                f"{info['best_step']})")

    result = phases.run("distill", lambda: distill(data.train, val, config, on_step,
                                                   validate=make_validator(batch)))
    return result, {"steps_run": result.steps_run, "best_step": result.best_step,
                    "evaluations": len(evals), "eval_seconds": round(sum(evals), 3),
                    "first_step_seconds": round(steps[0], 3) if steps else None,
                    "median_step_seconds": round(float(np.median(steps[1:] or steps)), 4)
                    if steps else None,
                    "val": _round(result.best_val)}


def ml1m_distill(data: SplitData, metric: str, batch: int, args: argparse.Namespace,
                 full_test: dict[str, float] | None) -> dict[str, Any]:
    from models.infinite_ae import SUMMARY_LAMBDAS
    from models.jax_infae import fit_select_device

    phases = Phases()
    result, info = distill_phase(data, metric, batch, args, phases, data.val_set())
    val, test = data.val_set(), data.test_set()
    model, path = phases.run("fit_summary", lambda: fit_select_device(
        result.summary, val, SUMMARY_LAMBDAS, select_metric=metric, path_metrics=(metric,),
        batch=batch))
    test_metrics = phases.run("test_summary", lambda: model.evaluate(test, batch=batch))
    out = {**phases.report(), **info, "lambda": model.lam, "test": _round(test_metrics)}
    if full_test:
        out["fidelity"] = round(test_metrics[metric] / full_test[metric], 4)
        out["fidelity_ndcg@10"] = round(test_metrics["ndcg@10"] / full_test["ndcg@10"], 4)
    return out


def netflix(args: argparse.Namespace, metric: str, batch: int) -> dict[str, Any]:
    import jax.numpy as jnp

    from models.baselines import PopRec
    from models.infinite_ae import FULL_DATA_LAMBDAS, SUMMARY_LAMBDAS
    from models.jax_infae import fit_select_device
    from models.jax_ranking import evaluate_score_batches_jax

    t0 = time.perf_counter()
    data = generate(args.users, args.items, args.rows, seed=args.seed)
    shape = {"users": data.n_users, "items": data.n_items, "train": int(data.train.nnz),
             "val": int(data.val.nnz), "test": int(data.test.nnz),
             "generate_seconds": round(time.perf_counter() - t0, 1)}
    say(f"netflix-shaped log: {json.dumps(shape)}")
    phases = Phases()
    # evaluation samples, as the stages draw them (their AUC negatives included: setup, untimed)
    t0 = time.perf_counter()
    dist_val = data.val_set(SHIPPED["eval_max_users"], 0)
    val = data.val_set(SHIPPED["max_users"], 0)
    test = data.test_set(SHIPPED["max_users"], 0)
    shape["samples_seconds"] = round(time.perf_counter() - t0, 1)

    # distill stage
    result, info = distill_phase(data, metric, batch, args, phases, dist_val)
    # the distill stage's baseline: ∞-AE on the budget's random users (the seed it started from)
    from models.samplers import random_users

    rand_support = random_users(data.train, result.summary.shape[0], 0)
    rand, _ = phases.run("random_users_fit", lambda: fit_select_device(
        rand_support, val, SUMMARY_LAMBDAS, select_metric=metric, batch=batch))
    phases.run("random_users_test", lambda: rand.evaluate(test, batch=batch))
    # fit stage: ∞-AE on the summary, λ on the validation sample, test on the test sample
    cand, _ = phases.run("fit", lambda: fit_select_device(
        result.summary, val, SUMMARY_LAMBDAS, select_metric=metric, batch=batch))
    cand_test = phases.run("fit_test", lambda: cand.evaluate(test, batch=batch))
    # evaluate stage: PopRec and the reference ∞-AE on a 20,000-user support
    pop = PopRec.fit(data.train)
    pop_row = jnp.asarray(pop.counts)

    def pop_batches(n: int):
        scores = jnp.broadcast_to(pop_row, (batch, pop_row.size))
        return ((start, scores) for start in range(0, n, batch))

    phases.run("poprec", lambda: (
        evaluate_score_batches_jax(pop_batches(val.context.shape[0]), val, batch=batch),
        evaluate_score_batches_jax(pop_batches(test.context.shape[0]), test, batch=batch)))
    n_ref = min(SHIPPED["reference_max_users"], data.n_users)
    rows = np.sort(np.random.default_rng(0).choice(data.n_users, size=n_ref, replace=False))
    ref_support = data.train[rows]
    ref, _ = phases.run("reference_fit", lambda: fit_select_device(
        ref_support, val, FULL_DATA_LAMBDAS, select_metric=metric, batch=batch))
    ref_test = phases.run("reference_test", lambda: ref.evaluate(test, batch=batch))
    # every user's top 100 (train + validation seen) from the reference model
    history = (data.train + data.val).tocsr()
    history.data[:] = 1.0
    phases.run("rank_all", lambda: ref.recommend(history, 100, batch=batch))
    report = phases.report()
    stage = {"distill": ["distill", "random_users_fit", "random_users_test"],
             "fit": ["fit", "fit_test"],
             "evaluate": ["poprec", "reference_fit", "reference_test"]}
    report["stage_seconds"] = {k: round(sum(report["seconds"][p] for p in v), 3)
                               for k, v in stage.items()}
    report["stage_seconds"]["total"] = round(sum(report["stage_seconds"].values()), 3)
    return {"log": shape, **report, "distill": info, "candidate_test": _round(cand_test),
            "reference_test": _round(ref_test), "candidate_lambda": cand.lam,
            "reference_lambda": ref.lam}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ml1m", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-1m"
                        / "interactions.parquet", help="ML-1M interactions Parquet (with split)")
    parser.add_argument("--only", default="ml1m-infae,ml1m-distill,netflix",
                        help="comma-separated phases: ml1m-infae, ml1m-distill, netflix")
    parser.add_argument("--metric", default="hr@100", help="validation metric picking λ and steps")
    parser.add_argument("--batch", type=int, default=2048, help="users per device batch")
    parser.add_argument("--repeat", type=int, default=2, help="ML-1M ∞-AE runs in this process")
    parser.add_argument("--budget", type=int, default=SHIPPED["budget"])
    parser.add_argument("--samples", type=int, default=SHIPPED["samples"])
    parser.add_argument("--distill-steps", type=int, default=SHIPPED["steps"],
                        help="Distill-CF steps at most (early stop may end sooner)")
    parser.add_argument("--rows", type=int, default=NETFLIX["rows"])
    parser.add_argument("--users", type=int, default=NETFLIX["users"])
    parser.add_argument("--items", type=int, default=NETFLIX["items"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=os.environ.get("JAX_COMPILATION_CACHE_DIR"),
                        help="persistent XLA compilation cache "
                             "(default: $JAX_COMPILATION_CACHE_DIR)")
    args = parser.parse_args(argv)
    only = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = only - {"ml1m-infae", "ml1m-distill", "netflix"}
    if unknown:
        parser.error(f"unknown phases: {sorted(unknown)}")

    import jax

    load_start = os.getloadavg()[0]
    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(args.cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    device = jax.devices()[0]
    out: dict[str, Any] = {"device": f"{device.platform}:{device.device_kind}",
                           "cpus": os.cpu_count(), "jax": jax.__version__,
                           "python": platform.python_version(), "metric": args.metric,
                           "batch": args.batch, "cache_dir": args.cache_dir}
    say(f"device {out['device']}")
    full_test = None
    if only & {"ml1m-infae", "ml1m-distill"}:
        t0 = time.perf_counter()
        data = load_parquet(args.ml1m)
        _ = data.negatives, data.item_weights  # untimed setup
        out["ml1m_load_seconds"] = round(time.perf_counter() - t0, 2)
        say(f"ML-1M: {data.n_users} users × {data.n_items} items, {data.train.nnz} train "
            f"({out['ml1m_load_seconds']}s)")
        if "ml1m-infae" in only:
            runs = []
            for r in range(max(1, args.repeat)):
                say(f"ML-1M ∞-AE, run {r + 1}:")
                runs.append(infae_all_users(data, args.metric, args.batch))
            out["ml1m_infae"] = runs
            full_test = runs[-1]["test"]
            say(f"ML-1M ∞-AE test: {json.dumps(full_test)}")
        if "ml1m-distill" in only:
            say("ML-1M Distill-CF:")
            out["ml1m_distill"] = ml1m_distill(data, args.metric, args.batch, args, full_test)
    if "netflix" in only:
        say("Netflix-shaped log:")
        out["netflix"] = netflix(args, args.metric, args.batch)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    out["loadavg_start_end"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
