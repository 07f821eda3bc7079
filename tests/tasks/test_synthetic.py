"""Tests of tasks.synthetic: determinism, shape of the distribution, atomic CSV output."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tasks.errors import InputError
from tasks.ingest import ingest
from tasks.synthetic import generate_interactions, write_synthetic


@pytest.fixture(scope="module")
def default_df() -> pl.DataFrame:
    return generate_interactions()


def test_schema_and_ids(default_df):
    df = default_df
    assert df.schema == pl.Schema({"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64})
    assert df["user_id"].n_unique() == 3000
    assert df["user_id"].min() >= 1000  # raw ids are not 0..U-1: re-indexing is exercised
    items = np.sort(df["item_id"].unique().to_numpy())
    assert items.min() > 0 and not np.array_equal(items, np.arange(len(items)))
    assert df["item_id"].n_unique() <= 1000
    assert df.select("user_id", "item_id").is_duplicated().sum() == 0
    assert df.equals(df.sort("user_id", "timestamp"))
    assert df["timestamp"].min() > 946_000_000


def test_activity_is_long_tailed(default_df):
    per_user = default_df.group_by("user_id").len()["len"]
    assert per_user.min() >= 5
    assert per_user.max() <= 500
    assert per_user.mean() > per_user.median() * 1.2  # right-skewed
    assert per_user.max() > 8 * per_user.median()


def test_item_popularity_is_power_law(default_df):
    counts = np.sort(default_df.group_by("item_id").len()["len"].to_numpy())[::-1]
    top10 = counts[: len(counts) // 10].sum() / counts.sum()
    assert top10 > 0.3  # the top 10% of items get a large share
    assert counts[0] > 20 * np.median(counts)


def test_deterministic_and_seeded():
    a = generate_interactions(n_users=200, n_items=120, seed=1)
    b = generate_interactions(n_users=200, n_items=120, seed=1)
    c = generate_interactions(n_users=200, n_items=120, seed=2)
    assert a.equals(b)
    assert not a.equals(c)


def test_fast_enough():
    t0 = time.perf_counter()
    generate_interactions(n_users=3000, n_items=1000, seed=5)
    assert time.perf_counter() - t0 < 2.0


def test_personalised_model_beats_popularity(tmp_path):
    """A ridge item-item model (EASE) clearly beats popularity on HR@10: the tastes are low-rank."""
    path = tmp_path / "s.csv"
    write_synthetic(path, n_users=800, n_items=300, seed=0)
    out = tmp_path / "out"
    m = ingest(path, out, seed=0)
    it = pl.read_parquet(out / "interactions.parquet")
    users, items = m["counts"]["users"], m["counts"]["items"]

    def matrix(splits):
        d = it.filter(pl.col("split").is_in(splits))
        x = np.zeros((users, items))
        x[d["user"].to_numpy(), d["item"].to_numpy()] = 1.0
        return x

    seen, target = matrix(["train", "val"]), matrix(["test"])
    gram = seen.T @ seen + 100.0 * np.eye(items)
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)

    def hr10(scores):
        scores = np.where(seen > 0, -np.inf, scores)
        top = np.argsort(-scores, axis=1)[:, :10]
        hits = np.take_along_axis(target, top, axis=1).sum(1)
        n = target.sum(1)
        return float((hits / np.minimum(n, 10))[n > 0].mean())

    pop = hr10(np.tile(seen.sum(0), (users, 1)))
    ease = hr10(seen @ b)
    assert ease > 1.5 * pop, (ease, pop)


def test_write_synthetic_byte_identical(tmp_path):
    a, b, c = tmp_path / "a.csv", tmp_path / "sub" / "b.csv", tmp_path / "c.csv"
    sa = write_synthetic(a, n_users=300, n_items=200, seed=3)
    write_synthetic(b, n_users=300, n_items=200, seed=3)
    write_synthetic(c, n_users=300, n_items=200, seed=4)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert a.read_text().splitlines()[0] == "user_id,item_id,timestamp"
    df = pl.read_csv(a)
    assert sa == {"path": str(a), "rows": df.height, "users": 300, "items": df["item_id"].n_unique()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "c.csv", "sub"]  # no temp files
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["b.csv"]


def test_write_synthetic_rejects_bad_arguments(tmp_path):
    with pytest.raises(InputError, match="items"):
        write_synthetic(tmp_path / "x.csv", n_users=10, n_items=5)
    with pytest.raises(InputError, match="users"):
        write_synthetic(tmp_path / "x.csv", n_users=1, n_items=50)
    with pytest.raises(InputError, match="is a directory"):
        write_synthetic(tmp_path, n_users=10, n_items=50)
    assert list(tmp_path.iterdir()) == []


def test_cli_generate_then_ingest(tmp_path):
    infrec = Path(sys.executable).parent / "infrec"
    from tests.helpers import clean_env

    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"state_dir": str(tmp_path / "state"),
                                  "generate": {"users": 200, "items": 100, "seed": 1}}))
    proc = subprocess.run([str(infrec), "generate", "--params", str(params), "-q"],
                          capture_output=True, text=True, timeout=60, env=clean_env())
    assert proc.returncode == 0, proc.stderr
    csv_path = tmp_path / "state" / "data" / "raw" / "interactions.csv"
    stats = json.loads(proc.stdout)
    assert stats["users"] == 200 and stats["rows"] == pl.read_csv(csv_path).height
    m = ingest(csv_path, tmp_path / "out", seed=1)
    assert m["counts"]["users"] == 200 and m["counts"]["rows"] == stats["rows"]
    assert hashlib.sha256(csv_path.read_bytes()).hexdigest() == m["input"]["sha256"]


# -- the 900 × 400 log of low-rank tastes plus popularity ---------------------------------------
def test_taste_popularity_shape_and_density():
    from tasks.synthetic import generate_taste_popularity

    df = generate_taste_popularity()
    assert df.schema == pl.Schema({"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64})
    assert df["user_id"].n_unique() == 900 and df["item_id"].n_unique() <= 400
    assert df["user_id"].min() == 5000 and df["item_id"].min() >= 2
    assert df.select("user_id", "item_id").is_duplicated().sum() == 0
    assert df.equals(df.sort("user_id", "timestamp"))
    per_user = df.group_by("user_id").len()["len"]
    assert per_user.min() >= 5 and per_user.max() <= 100
    assert 30 <= per_user.median() <= 50  # ≈ 10% of the catalogue: a dense log
    counts = np.sort(df.group_by("item_id").len()["len"].to_numpy())[::-1]
    assert counts[: len(counts) // 10].sum() / counts.sum() > 0.2  # popular items stand out


def test_write_taste_popularity_is_deterministic_and_atomic(tmp_path):
    from tasks.synthetic import generate_taste_popularity, write_taste_popularity

    a, b, c = tmp_path / "a.csv", tmp_path / "sub" / "b.csv", tmp_path / "c.csv"
    stats = write_taste_popularity(a)
    write_taste_popularity(b)
    write_taste_popularity(c, seed=1)
    assert a.read_bytes() == b.read_bytes() and a.read_bytes() != c.read_bytes()
    assert stats == {"path": str(a), "rows": generate_taste_popularity().height, "users": 900,
                     "items": pl.read_csv(a)["item_id"].n_unique()}
    assert a.read_text().splitlines()[0] == "user_id,item_id,timestamp"
    # the file the benchmarks were measured on (NumPy's PCG64 streams are stable across machines)
    assert hashlib.sha256(a.read_bytes()).hexdigest() == (
        "b3dca0c929fa12502b0647702fd664bce82feb67846bdc391d571df49e7f1dfa")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "c.csv", "sub"]
    with pytest.raises(InputError, match="items"):
        write_taste_popularity(tmp_path / "x.csv", n_items=10)
    m = ingest(a, tmp_path / "out", seed=0)
    assert m["counts"]["users"] == 900 and m["counts"]["dropped_users"] == 0


def test_the_readmes_recommend_lines_name_ids_of_the_embedded_default(default_df):
    """`infrec recommend --user N` / `--history A,B,C` in the README, verbatim after `make run`:
    the user and the items exist in the embedded default (users 1000–3999, items 7j + 3), every
    user of which keeps its history (at least min_user_interactions interactions)."""
    import re

    import yaml

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    shipped = yaml.safe_load((root / "params.yaml").read_text())
    assert (shipped["generate"]["users"], shipped["generate"]["items"]) == (3000, 1000)
    users = [int(u) for u in re.findall(r"infrec recommend --user (\d+)", readme)]
    items = [int(i) for h in re.findall(r"infrec recommend --history ([\d,]+)", readme)
             for i in h.split(",")]
    assert users and items
    per_user = dict(default_df.group_by("user_id").len().iter_rows())
    for u in users:
        assert per_user.get(u, 0) >= shipped["ingest"]["min_user_interactions"], u
    assert set(items) <= set(default_df["item_id"].to_list()), items
