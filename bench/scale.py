"""Scale benchmark: 10M-interaction ingestion (Polars vs pandas) and ∞-AE for all 100k users.

    .venv/bin/python -m bench.scale [--users 100000 --items 10000 --rows 10000000
                                     --support-frac 0.05 --k 100 --batch 4096]

1. Writes a synthetic interaction CSV (``user_id,item_id,rating,timestamp``) into a temporary
   directory: ``--users`` users with long-tailed (lognormal) activity, ``--rows`` rows in all,
   power-law item popularity (``rank^-0.9``) mixed with a per-user taste group (so a personalised
   model has something to learn); duplicates and users with < 3 interactions occur, as in real logs.
   Deterministic for a seed.
2. Ingests it twice in this process, timed: :func:`tasks.ingest.ingest` (Polars) and
   :func:`pandas_ingest` below (idiomatic, vectorised pandas doing the same steps: read CSV,
   validate types, de-duplicate (user, item), binarise, drop users with < 3 interactions, the
   paper's random split per user with the seed, contiguous re-indexing, write Parquet). The two
   outputs are checked to be identical (untimed).
3. ∞-AE (timed as ``fit_predict_seconds``, from the ingested directory): load it, sample a
   ``--support-frac`` user support (:func:`tasks.fit.choose_support`), blocked sparse kernel and
   Cholesky at a fixed λ (``--lam``, default 5; or ``--lambdas`` chosen on validation HR@100 of
   ``--val-users`` users), then top-``k`` unseen items for every user from their train+val
   histories in batches (:mod:`models.large`: sparse cross dots, fused NTK, dense score matmul,
   top-k). The score matmul alone — ``(b × n) @ (n × m)`` float32 on the same shapes, for every
   batch of the run (the whole floor, not an extrapolation) — is timed interleaved with the
   prediction batches as ``matmul_floor_seconds``, so both see the same machine load.
4. Untimed sanity check: test HR@100 / nDCG@10 of the predicted lists against popularity.

Progress on stderr; the last stdout line is one JSON object:
``{"rows", "polars_seconds", "pandas_seconds", "speedup", "fit_predict_seconds",
"matmul_floor_seconds", "peak_rss_mb"}`` (``peak_rss_mb``: the process's peak resident set,
all phases; per-phase peaks go to stderr).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import say

T0 = 946_684_800  # 2000-01-01
_SPLITS = np.array(["train", "val", "test"], dtype=object)


# --------------------------------------------------------------------------------------------
# memory


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakRSS:
    """Peak resident set per phase: VmHWM, reset between phases where Linux allows it."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    def end(self, phase: str) -> float:
        hwm = _status_kb("VmHWM")
        mb = (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024.0
        self.phases[phase] = mb
        try:  # "5" resets the peak RSS (Linux >= 4.0); otherwise later phases include earlier ones
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        return mb

    @property
    def peak(self) -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        return max([usage, *self.phases.values()])


# --------------------------------------------------------------------------------------------
# synthetic file


def write_csv(path: Path, *, n_users: int, n_items: int, rows: int, seed: int = 0, groups: int = 50,
              zipf: float = 0.9, min_user_rows: int = 0) -> dict:
    """A long-tailed synthetic interaction log as CSV; vectorised, deterministic for ``seed``.

    Netflix-/Amazon-shaped: log-normal user activity (σ = 1; every user at least
    ``min_user_rows`` rows, so ``rows`` grows by the few users raised), Zipf item popularity
    (``rank^-zipf``), half of each user's picks from their taste group's own order of the same
    popularity curve (``groups`` groups). Duplicates occur, as in real logs.
    """
    import polars as pl

    rng = np.random.default_rng(seed)
    activity = rng.lognormal(0.0, 1.0, n_users)  # long-tailed user activity
    counts = rng.multinomial(rows, activity / activity.sum())
    if min_user_rows:
        counts = np.maximum(counts, min_user_rows)
        rows = int(counts.sum())
    users = np.repeat(np.arange(n_users, dtype=np.int64), counts)
    cdf = np.cumsum(np.arange(1, n_items + 1, dtype=np.float64) ** -float(zipf))  # popularity by rank
    ranks = np.minimum(np.searchsorted(cdf / cdf[-1], rng.random(rows), side="right"), n_items - 1)
    # row 0: the global item order; row g+1: taste group g's own order of the same popularity curve
    perms = np.argsort(rng.random((groups + 1, n_items)), axis=1)
    group = rng.integers(0, groups, n_users)
    table = np.where(rng.random(rows) < 0.5, 1 + group[users], 0)
    items = perms[table, ranks]
    del table, ranks
    order = rng.permutation(rows)  # a log in time order, not grouped by user
    frame = pl.DataFrame(
        {
            "user_id": 1000 + 7 * users[order],
            "item_id": 3 + 11 * items[order],
            "rating": rng.integers(1, 6, rows),
            "timestamp": T0 + np.sort(rng.integers(0, 3 * 365 * 86_400, rows)),
        }
    )
    del users, items, order
    frame.write_csv(path)
    return {"rows": rows, "users": int((counts > 0).sum()), "items": n_items, "zipf": zipf,
            "groups": groups, "seed": seed, "bytes": path.stat().st_size,
            "user_rows": {"mean": round(float(counts.mean()), 1), "min": int(counts.min()),
                          "max": int(counts.max())}}


# --------------------------------------------------------------------------------------------
# pandas ingestion: the same steps as tasks.ingest (CSV with a header, no split column)


def pandas_ingest(input_path, out_dir, *, seed: int = 0, min_user_interactions: int = 3,
                  user_col: str = "user_id", item_col: str = "item_id", rating_col: str = "rating") -> dict:
    """Idiomatic pandas: read, validate, de-duplicate, binarise, filter, split, re-index, write."""
    import pandas as pd

    input_path, out_dir = Path(input_path), Path(out_dir)
    # read + validate types: integer ids (pandas raises on a non-integer or missing id), ratings
    # finite and >= 0
    try:
        df = pd.read_csv(input_path, usecols=[user_col, item_col, rating_col],
                         dtype={user_col: "int64", item_col: "int64", rating_col: "float64"})
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{input_path}: {exc}") from None
    bad = ~np.isfinite(df[rating_col].to_numpy()) | (df[rating_col].to_numpy() < 0)
    if bad.any():
        line = int(np.argmax(bad)) + 2
        raise ValueError(f"{input_path}: line {line}: column {rating_col!r}: invalid rating")
    input_rows = len(df)
    # de-duplicate (user, item) and binarise (every remaining row is a positive)
    df = df.drop_duplicates([user_col, item_col])[[user_col, item_col]]
    # drop users with fewer than min_user_interactions interactions (whole users are dropped, so
    # the per-user count stays valid for the split below)
    df["n"] = df.groupby(user_col)[item_col].transform("size")
    df = df[df["n"] >= min_user_interactions]
    # the paper's random split: rows sorted by (user, item), keys from default_rng(seed), each
    # user's rows ranked by key; rank 0 -> test, then train / val / test by 80/10/10 of (n - 1)
    df = df.sort_values([user_col, item_col], ignore_index=True)
    df["key"] = np.random.default_rng(seed).random(len(df))
    pos = df.groupby(user_col)["key"].rank(method="first").to_numpy(dtype=np.int64) - 1
    cnt = df["n"].to_numpy(dtype=np.int64)
    code = np.full(len(df), 2, dtype=np.int8)
    code[(pos > 0) & (10 * pos < 9 * (cnt - 1))] = 1
    code[(pos > 0) & (10 * pos < 8 * (cnt - 1))] = 0
    # contiguous re-indexing by sorted raw id, over the kept rows
    user_idx, user_ids = pd.factorize(df[user_col], sort=True)
    item_idx, item_ids = pd.factorize(df[item_col], sort=True)
    interactions = pd.DataFrame({
        "user": user_idx.astype(np.int32),
        "item": item_idx.astype(np.int32),
        "split": _SPLITS[code],
    })
    user_map = pd.DataFrame({"user": np.arange(len(user_ids), dtype=np.int32),
                             "raw_id": np.asarray(user_ids, dtype=np.int64)})
    item_map = pd.DataFrame({"item": np.arange(len(item_ids), dtype=np.int32),
                             "raw_id": np.asarray(item_ids, dtype=np.int64)})
    out_dir.mkdir(parents=True, exist_ok=False)
    for name, table in (("interactions", interactions), ("user_map", user_map), ("item_map", item_map)):
        table.to_parquet(out_dir / f"{name}.parquet", compression="zstd", index=False)
    counts = {"input_rows": input_rows, "rows": len(interactions), "users": len(user_ids),
              "items": len(item_ids), **{s: int((code == i).sum()) for i, s in enumerate(_SPLITS)}}
    (out_dir / "manifest.json").write_text(json.dumps({"seed": seed, "counts": counts}, indent=2))
    return counts


def same_outputs(a: Path, b: Path) -> bool:
    """The two ingestions wrote the same tables (values and order)."""
    import polars as pl

    for name, cols in (("interactions", ["user", "item", "split"]), ("user_map", ["user", "raw_id"]),
                       ("item_map", ["item", "raw_id"])):
        x, y = (pl.read_parquet(d / f"{name}.parquet").select(cols) for d in (a, b))
        if "split" in cols:
            x, y = (f.with_columns(pl.col("split").cast(pl.String)) for f in (x, y))
        if x.shape != y.shape or not x.equals(y):
            say(f"  {name}: polars {x.shape} vs pandas {y.shape} differ")
            return False
    return True


# --------------------------------------------------------------------------------------------
# ∞-AE at scale


def fit_predict(data_dir: Path, args: argparse.Namespace) -> dict:
    """Load, fit on a user support, top-k for every user; floor matmul timed between batches."""
    import scipy.sparse as sp

    from models.infinite_ae import EvalSet, fit_select
    from models.kernels import NTKConfig
    from models.large import BlockedScorer, blocked_kernel_matrix, fit_support
    from tasks.data import load_dataset
    from tasks.fit import choose_support

    config = NTKConfig(depth=args.depth)
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    data = load_dataset(data_dir)
    history = (data.train + data.val).tocsr()  # what a user has seen: train + validation
    history.data[:] = 1.0
    seconds["load"] = time.perf_counter() - t0
    say(f"  load: {data.n_users} users × {data.n_items} items, {data.train.nnz} train "
        f"({seconds['load']:.1f}s)")

    t0 = time.perf_counter()
    support, info, _ = choose_support(data, user_support=args.support_frac, seed=args.seed)
    support_csr = sp.csr_matrix(support)
    kernel = blocked_kernel_matrix(support_csr, config, threads=args.threads)
    seconds["kernel"] = time.perf_counter() - t0
    say(f"  support: {info['rows']} users; kernel {kernel.shape[0]}² ({seconds['kernel']:.1f}s)")

    t0 = time.perf_counter()
    lambdas = [float(v) for v in args.lambdas.split(",")] if args.lambdas else [args.lam]
    if len(lambdas) == 1:
        model = fit_support(support, lambdas[0], config, kernel=kernel)
        say(f"  solve λ={model.lam:g} (fixed)")
    else:
        rng = np.random.default_rng(args.seed + 1)
        users = np.sort(rng.choice(data.n_users, size=min(args.val_users, data.n_users), replace=False))
        val = EvalSet(context=data.train[users], targets=data.val[users], weights=data.item_weights)
        model, path = fit_select(support, val, lambdas, config, kernel=kernel,
                                 select_metric="hr@100")
        say("  λ path (val hr@100 on {} users): {}".format(
            len(users), ", ".join(f"{r.lam:g}:{r.val['hr@100']:.2f}" for r in path)))
        say(f"  chose λ={model.lam:g}")
    del kernel
    seconds["solve"] = time.perf_counter() - t0
    say(f"  solve: {seconds['solve']:.1f}s")

    n, m = model.support.shape
    top = np.empty((data.n_users, min(args.k, m)), dtype=np.int32)
    left = np.random.default_rng(args.seed).random((args.batch, n), dtype=np.float32)
    floor_out = np.empty((args.batch, m), dtype=np.float32)
    predict = floor = 0.0
    with BlockedScorer(model, threads=args.threads) as scorer:
        batches = scorer.iter_top_k(history, args.k, args.batch)
        done = 0
        while True:
            t0 = time.perf_counter()
            step = next(batches, None)
            predict += time.perf_counter() - t0
            if step is None:
                break
            start, items, _ = step
            top[start : start + len(items)] = items
            rows = len(items)
            t0 = time.perf_counter()
            np.matmul(left[:rows], model.alpha, out=floor_out[:rows])  # the bare score matmul
            floor += time.perf_counter() - t0
            done += rows
            if (done // args.batch) % 5 == 0 or done == data.n_users:
                say(f"  predicted {done}/{data.n_users} users: {predict:.1f}s (floor so far {floor:.1f}s)")
        seconds["predict"] = predict
        seconds.update({f"predict.{k}": v for k, v in scorer.seconds.items()})
    total = time.perf_counter() - t_all - floor
    return {"seconds": seconds, "fit_predict_seconds": total, "matmul_floor_seconds": floor,
            "top": top, "data": data, "history": history, "lam": model.lam, "n_support": n}


def sanity_metrics(top: np.ndarray, data, history) -> dict:
    """Test HR@100 / nDCG@10 of the lists, and of popularity (train counts), for all users."""
    from models.metrics import RankingAccumulator, top_k_unseen

    acc, pop_acc = RankingAccumulator(weights=data.item_weights), RankingAccumulator(weights=data.item_weights)
    pop = np.asarray(data.train.sum(axis=0), dtype=np.float32).ravel()
    step = 4096
    for s in range(0, data.n_users, step):
        e = min(s + step, data.n_users)
        acc.add(top[s:e].astype(np.int64), data.test[s:e])
        pop_scores = np.broadcast_to(pop, (e - s, pop.size)).copy()
        pop_acc.add(top_k_unseen(pop_scores, history[s:e], top.shape[1], overwrite=True), data.test[s:e])
    keys = ("hr@10", "ndcg@10", "hr@100")
    return {"infae": {k: round(acc.result()[k], 2) for k in keys},
            "popularity": {k: round(pop_acc.result()[k], 2) for k in keys}}


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--support-frac", type=float, default=0.05, help="user support: fraction (≤1) or count")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--batch", type=int, default=4096, help="users per prediction batch")
    parser.add_argument("--lam", type=float, default=5.0, help="fixed λ (when --lambdas is not given)")
    parser.add_argument("--lambdas", default=None, help="λ grid chosen on validation, e.g. 1,5,20,50")
    parser.add_argument("--val-users", type=int, default=2000, help="validation users for --lambdas")
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="threads for sparse dots/NTK")
    parser.add_argument("--no-sanity", action="store_true", help="skip the untimed test metrics")
    parser.add_argument("--workdir", default=None, help="directory for the files (default: a temp dir)")
    args = parser.parse_args(argv)

    from tasks.ingest import ingest

    rss = PeakRSS()
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="infrec-scale-") as tmp:
        tmp = Path(tmp)
        csv = tmp / "interactions.csv"
        t0 = time.perf_counter()
        gen = write_csv(csv, n_users=args.users, n_items=args.items, rows=args.rows, seed=args.seed)
        say(f"generated {gen['rows']} rows, {gen['users']} users, {gen['bytes'] / 2**20:.0f} MiB "
            f"in {time.perf_counter() - t0:.1f}s")
        rss.end("generate")

        t0 = time.perf_counter()
        manifest = ingest(csv, tmp / "polars", seed=args.seed)
        polars_s = time.perf_counter() - t0
        say(f"polars ingest: {polars_s:.2f}s → {manifest['counts']}")
        rss.end("polars_ingest")

        t0 = time.perf_counter()
        counts = pandas_ingest(csv, tmp / "pandas", seed=args.seed)
        pandas_s = time.perf_counter() - t0
        say(f"pandas ingest: {pandas_s:.2f}s → {counts}")
        rss.end("pandas_ingest")
        if not same_outputs(tmp / "polars", tmp / "pandas"):
            raise SystemExit("pandas and Polars ingestion outputs differ: the comparison is void")
        say(f"outputs identical; speedup {pandas_s / polars_s:.1f}×")
        csv.unlink()

        say("∞-AE:")
        res = fit_predict(tmp / "polars", args)
        ratio = res["fit_predict_seconds"] / res["matmul_floor_seconds"]
        say(f"fit+predict {res['fit_predict_seconds']:.1f}s ({json.dumps({k: round(v, 2) for k, v in res['seconds'].items()})}); "
            f"matmul floor {res['matmul_floor_seconds']:.1f}s; ratio {ratio:.2f}")
        rss.end("fit_predict")
        if not args.no_sanity:
            say(f"sanity (test, all users): {json.dumps(sanity_metrics(res['top'], res['data'], res['history']))}")
    say("peak RSS by phase (MB): " + json.dumps({k: round(v) for k, v in rss.phases.items()}))
    result = {
        "rows": args.rows,
        "polars_seconds": round(polars_s, 3),
        "pandas_seconds": round(pandas_s, 3),
        "speedup": round(pandas_s / polars_s, 2),
        "fit_predict_seconds": round(res["fit_predict_seconds"], 3),
        "matmul_floor_seconds": round(res["matmul_floor_seconds"], 3),
        "peak_rss_mb": round(rss.peak, 1),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
