"""Tests of tasks.ingest: formats, protocol, determinism, atomic outputs and bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import tasks.ingest as ingest_module
from tasks.errors import InputError
from tasks.ingest import ingest, random_split, validate

# Four users: 10 (4 items), 20 (3 items), 30 (5 items), 40 (2 items -> dropped by the <3 filter).
ROWS = [
    (10, 100, 5.0, 978300760),
    (10, 205, 3.0, 978302109),
    (10, 301, 4.0, 978301968),
    (10, 999, 1.0, 978300275),
    (20, 100, 4.0, 978824291),
    (20, 420, 2.0, 978300719),
    (20, 999, 5.0, 978302268),
    (30, 205, 5.0, 978301368),
    (30, 301, 3.0, 978824268),
    (30, 420, 4.0, 978301752),
    (30, 555, 2.0, 978302281),
    (30, 777, 5.0, 978302124),
    (40, 100, 3.0, 978301753),
    (40, 888, 4.0, 978302188),
]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_dat(path: Path, rows=ROWS) -> Path:
    path.write_text("".join(f"{u}::{i}::{int(r)}::{t}\n" for u, i, r, t in rows))
    return path


def write_csv(path: Path, rows=ROWS, header=("userId", "movieId", "rating", "timestamp"), sep=",") -> Path:
    lines = [sep.join(header)] + [sep.join(str(x) for x in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_parquet(path: Path, rows=ROWS) -> Path:
    pl.DataFrame(
        rows, schema={"user_id": pl.Int32, "item_id": pl.Int32, "rating": pl.Float32, "timestamp": pl.Int64},
        orient="row",
    ).write_parquet(path)
    return path


def read(out: Path, name: str = "interactions.parquet") -> pl.DataFrame:
    return pl.read_parquet(out / name)


def raw_pairs(out: Path) -> pl.DataFrame:
    """Interactions mapped back to raw ids, for comparisons with the input."""
    it = read(out)
    umap = read(out, "user_map.parquet").rename({"raw_id": "raw_user"})
    imap = read(out, "item_map.parquet").rename({"raw_id": "raw_item"})
    return it.join(umap, on="user").join(imap, on="item").select("raw_user", "raw_item", "split").sort(
        "raw_user", "raw_item"
    )


def assert_nothing_left(parent: Path, out: Path) -> None:
    assert not out.exists()
    if parent.exists():
        assert [p.name for p in parent.iterdir()] == []


# --------------------------------------------------------------------------------------------
# formats


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "in"
    d.mkdir()
    return {
        "movielens": write_dat(d / "ratings.dat"),
        "csv": write_csv(d / "ratings.csv"),
        "tsv": write_csv(d / "ratings.tsv", header=("user_id", "item_id", "rating", "timestamp"), sep="\t"),
        "parquet": write_parquet(d / "ratings.parquet"),
    }


@pytest.mark.parametrize("fmt", ["movielens", "csv", "tsv", "parquet"])
def test_each_format_gives_the_same_outputs(inputs, tmp_path, fmt):
    out = tmp_path / f"out-{fmt}"
    m = ingest(inputs[fmt], out, seed=3)
    assert m["input"]["format"] == fmt
    assert m["input"] == {"name": inputs[fmt].name, "size": inputs[fmt].stat().st_size,
                          "sha256": sha(inputs[fmt]), "format": fmt}
    assert m["split_source"] == "random"
    assert m["counts"] == {
        "rows": 12, "users": 3, "items": 7, "train": m["counts"]["train"], "val": m["counts"]["val"],
        "test": m["counts"]["test"], "dropped_users": 1,
    }
    assert m["counts"]["train"] + m["counts"]["val"] + m["counts"]["test"] == 12
    assert sorted(p.name for p in out.iterdir()) == [
        "interactions.parquet", "item_map.parquet", "manifest.json", "user_map.parquet",
    ]
    reference = tmp_path / "out-ref"
    ingest(inputs["movielens"], reference, seed=3)
    for name in ("interactions.parquet", "user_map.parquet", "item_map.parquet"):
        assert sha(out / name) == sha(reference / name)
        assert m["outputs"][name] == sha(out / name)


def test_output_schema_and_reindexing(inputs, tmp_path):
    out = tmp_path / "out"
    ingest(inputs["csv"], out)
    it, umap, imap = read(out), read(out, "user_map.parquet"), read(out, "item_map.parquet")
    assert it.schema == pl.Schema({"user": pl.Int32, "item": pl.Int32, "split": pl.String})
    assert umap.schema == pl.Schema({"user": pl.Int32, "raw_id": pl.Int64})
    assert imap.schema == pl.Schema({"item": pl.Int32, "raw_id": pl.Int64})
    assert it.equals(it.sort("user", "item"))
    assert umap["user"].to_list() == [0, 1, 2] and umap["raw_id"].to_list() == [10, 20, 30]
    # item 888 belonged only to the dropped user 40: not re-indexed
    assert imap["item"].to_list() == list(range(7))
    assert imap["raw_id"].to_list() == sorted({i for u, i, _, _ in ROWS if u != 40})
    assert sorted(it["user"].unique().to_list()) == [0, 1, 2]
    assert sorted(it["item"].unique().to_list()) == list(range(7))
    back = raw_pairs(out)
    assert back.select("raw_user", "raw_item").rows() == sorted((u, i) for u, i, _, _ in ROWS if u != 40)


def test_format_detection_by_content_and_override(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    dat = write_dat(d / "ratings.txt")
    tsv = write_csv(d / "data", header=("user_id", "item_id", "rating", "timestamp"), sep="\t")
    csv_ = write_csv(d / "data2")
    pq = write_parquet(d / "blob.bin")
    assert ingest(dat, tmp_path / "a")["input"]["format"] == "movielens"
    assert ingest(tsv, tmp_path / "b")["input"]["format"] == "tsv"
    assert ingest(csv_, tmp_path / "c")["input"]["format"] == "csv"
    assert ingest(pq, tmp_path / "d")["input"]["format"] == "parquet"
    # override: a ratings.dat content in a .csv file
    odd = write_dat(d / "odd.csv")
    assert ingest(odd, tmp_path / "e", fmt="movielens")["input"]["format"] == "movielens"
    with pytest.raises(InputError, match="unknown format"):
        ingest(dat, tmp_path / "f", fmt="xlsx")


def test_custom_column_names(tmp_path):
    src = write_csv(tmp_path / "x.csv", header=("who", "what", "stars", "when"))
    out = tmp_path / "out"
    m = ingest(src, out, columns={"user": "who", "item": "what", "rating": "stars"}, min_rating=3)
    # rating >= 3: users 20 and 40 keep 2 interactions each and are dropped
    assert m["counts"]["rows"] == 7 and m["counts"]["dropped_users"] == 2
    with pytest.raises(InputError, match="'nope'"):
        ingest(src, tmp_path / "o2", columns={"user": "nope", "item": "what"})


# --------------------------------------------------------------------------------------------
# protocol


def test_split_column_used_as_is(tmp_path):
    rows = [
        (1, 11, "train"), (1, 12, "train"), (1, 13, "val"), (1, 14, "test"),
        (2, 11, "train"), (2, 15, "test"), (2, 16, "train"),
        (3, 12, "val"), (3, 13, "test"), (3, 14, "test"),  # no train rows: kept and evaluated
        (4, 11, "train"), (4, 12, "test"),  # 2 interactions: kept too (the split is the file's)
    ]
    src = tmp_path / "split.csv"
    src.write_text("user_id,item_id,split\n" + "".join(f"{u},{i},{s}\n" for u, i, s in rows))
    out = tmp_path / "out"
    m = ingest(src, out, seed=123)
    assert m["split_source"] == "file"
    assert m["counts"] == {"rows": 12, "users": 4, "items": 6, "train": 5, "val": 2, "test": 5, "dropped_users": 0}
    assert m["min_user_interactions"] is None  # not applied to a given split
    back = raw_pairs(out)
    assert back.rows() == sorted(rows)
    # the seed is irrelevant with a split column
    out2 = tmp_path / "out2"
    ingest(src, out2, seed=999)
    assert sha(out / "interactions.parquet") == sha(out2 / "interactions.parquet")


def test_given_split_keeps_every_user_with_a_target(tmp_path):
    """Only exact duplicates collapse: a user with a single test row, or one train and one test
    row, is still there to be evaluated, whatever ``min_user_interactions`` says."""
    rows = [
        (1, 11, "train"), (1, 12, "train"), (1, 13, "val"), (1, 14, "test"),
        (2, 11, "train"), (2, 12, "test"),
        (3, 13, "test"),  # one row, a test target
        (4, 12, "val"), (4, 12, "val"),  # one validation target, written twice
        (5, 11, "train"), (5, 11, "test"),  # the same pair twice: the earliest split (train) stays
        (6, 14, "train"),  # train only: kept (it is a row), no target
    ]
    src = tmp_path / "split.csv"
    src.write_text("user_id,item_id,split\n" + "".join(f"{u},{i},{s}\n" for u, i, s in rows))
    for min_users in (3, 10):
        out = tmp_path / f"out{min_users}"
        m = ingest(src, out, min_user_interactions=min_users)
        assert m["counts"]["users"] == 6 and m["counts"]["dropped_users"] == 0
        assert m["filtered"]["duplicates"] == 2 and m["filtered"]["rows_of_dropped_users"] == 0
        assert raw_pairs(out).rows() == sorted(set(rows) - {(5, 11, "test")})
    from tasks.data import load_dataset

    data = load_dataset(tmp_path / "out3")
    with_target = set(np.flatnonzero(np.diff((data.val + data.test).tocsr().indptr) > 0))
    assert {int(data.user_ids[u]) for u in with_target} == {1, 2, 3, 4}
    assert data.test.shape[0] == data.train.shape[0] == 6


def test_min_user_interactions_applies_to_drawn_splits(tmp_path):
    # users 10 (4 items), 20 (3), 30 (5), 40 (2)
    src = write_csv(tmp_path / "r.csv")
    for min_users, kept in ((1, [10, 20, 30, 40]), (2, [10, 20, 30, 40]), (3, [10, 20, 30]),
                            (5, [30])):
        if len(kept) < 2:
            with pytest.raises(InputError, match="only 1 user"):
                ingest(src, tmp_path / f"o{min_users}", min_user_interactions=min_users)
            continue
        m = ingest(src, tmp_path / f"o{min_users}", min_user_interactions=min_users)
        assert m["split_source"] == "random" and m["min_user_interactions"] == min_users
        assert read(tmp_path / f"o{min_users}", "user_map.parquet")["raw_id"].to_list() == kept
        assert m["counts"]["dropped_users"] == 4 - len(kept)


def test_manifest_and_data_version_do_not_depend_on_the_input_location(inputs, tmp_path):
    from tasks.data import load_dataset

    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    copy = elsewhere / inputs["csv"].name
    copy.write_bytes(inputs["csv"].read_bytes())
    a, b = tmp_path / "a", tmp_path / "deeper" / "b"
    ingest(inputs["csv"], a, seed=2)
    ingest(copy, b, seed=2)
    for name in ("interactions.parquet", "user_map.parquet", "item_map.parquet", "manifest.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    text = (a / "manifest.json").read_text()
    assert str(tmp_path) not in text and "path" not in json.loads(text)["input"]
    assert load_dataset(a).data_version == load_dataset(b).data_version


def test_auc_negatives_follow_the_specification(tmp_path):
    """Negatives are items in neither the user's train nor test set: validation items may be
    drawn (``../shared/docs/algorithms.md``, as the reference does), train and test items never."""
    from tasks.data import AUC_NEGATIVES, load_dataset

    # 60 items. User 1: train 0-4, test 5-9, validation 10-19: exactly 50 items are neither train
    # nor test for it (10-59), so its 50 negatives must be all of them, its validation items too.
    rows = [(1, i, "train") for i in range(5)] + [(1, i, "test") for i in range(5, 10)]
    rows += [(1, i, "val") for i in range(10, 20)]
    for k, user in enumerate(range(2, 7)):  # users 2-6 cover items 20-59: 7 train + 1 test each
        items = list(range(20 + 8 * k, 28 + 8 * k))
        rows += [(user, i, "train") for i in items[:7]] + [(user, items[7], "test")]
        rows += [(user, items[0] - 20, "val")]
    src = tmp_path / "split.csv"
    src.write_text("user_id,item_id,split\n" + "".join(f"{u},{1000 + i},{s}\n" for u, i, s in rows))
    ingest(src, tmp_path / "out")
    data = load_dataset(tmp_path / "out")
    assert data.n_items == 60 and AUC_NEGATIVES == 50
    negatives = data.negatives
    assert negatives.shape == (6, 50)
    assert sorted(data.item_ids[negatives[0]] - 1000) == list(range(10, 60))
    train, val, test = data.train.toarray(), data.val.toarray(), data.test.toarray()
    for u in range(6):
        assert len(set(negatives[u])) == 50
        assert not train[u, negatives[u]].any() and not test[u, negatives[u]].any()
    assert val[np.arange(6)[:, None], negatives].sum() > 10  # validation items are drawn
    # the same negatives for validation and test, as in the reference
    assert data.val_set().negatives is data.test_set().negatives


def expected_counts(n: int) -> tuple[int, int, int]:
    """Shuffled position i = 0 is test; i = 1..n-1: < 0.8(n-1) train, < 0.9(n-1) val, else test."""
    train = sum(1 for i in range(1, n) if i < 0.8 * (n - 1))
    val = sum(1 for i in range(1, n) if 0.8 * (n - 1) <= i < 0.9 * (n - 1))
    return train, val, n - train - val


def test_random_split_proportions_and_forced_test(tmp_path):
    rng = np.random.default_rng(7)
    sizes = {100 + 5 * u: int(n) for u, n in enumerate(rng.integers(3, 60, size=150))}
    rows = [(u, 1000 + 3 * int(i), 4.0, 0) for u, n in sizes.items() for i in rng.choice(400, n, replace=False)]
    src = write_csv(tmp_path / "r.csv", rows=rows)
    out = tmp_path / "out"
    m = ingest(src, out, seed=5)
    back = raw_pairs(out)
    per_user = back.group_by("raw_user").agg(
        [(pl.col("split") == s).sum().alias(s) for s in ("train", "val", "test")]
    )
    for u, train, val, test in per_user.sort("raw_user").iter_rows():
        assert (train, val, test) == expected_counts(sizes[u]), u
        assert test >= 1
    total = sum(sizes.values())
    assert abs(m["counts"]["train"] / total - 0.8) < 0.06  # short histories: a little below 80%
    assert abs(m["counts"]["val"] / total - 0.1) < 0.03


def test_random_split_is_a_shuffle():
    # one user with 1001 rows: which positions land in test must vary with the seed and cover all
    users = np.zeros(1001, dtype=np.int64)
    codes = [random_split(users, seed) for seed in range(20)]
    assert len({c.tobytes() for c in codes}) == 20
    hit = np.zeros(1001)
    for c in codes:
        hit += c == 0
    train, val, test = expected_counts(1001)
    assert all(((c == 0).sum(), (c == 1).sum(), (c == 2).sum()) == (train, val, test) for c in codes)
    assert hit.sum() == train * 20
    assert hit.min() > 0  # every position was in train for some seed


def test_random_split_follows_its_definition():
    """Per user: shuffle by the keys, position 0 -> test, 10i < 8(n-1) train, < 9(n-1) val."""
    rng = np.random.default_rng(0)
    sizes = np.concatenate([np.arange(1, 30), rng.integers(1, 300, 60)])
    users = np.repeat(7 + 3 * np.arange(len(sizes)), sizes)
    for seed in (0, 1, 11):
        keys = np.random.default_rng(seed).random(len(users))
        expected = np.empty(len(users), dtype=np.int8)
        start = 0
        for n in sizes:
            shuffled = start + np.argsort(keys[start : start + n], kind="stable")
            for i, row in enumerate(shuffled):
                train, val = 10 * i < 8 * (n - 1), 10 * i < 9 * (n - 1)
                expected[row] = 2 if i == 0 else 0 if train else 1 if val else 2
            start += n
        assert np.array_equal(random_split(users, seed), expected), seed


def test_dedup_keeps_earliest_split(tmp_path):
    rows = [
        (1, 11, "test"), (1, 11, "val"), (1, 11, "train"), (1, 12, "val"), (1, 12, "test"),
        (1, 13, "test"), (1, 13, "test"),
        (2, 11, "train"), (2, 12, "train"), (2, 13, "test"),
    ]
    src = tmp_path / "d.csv"
    src.write_text("user_id,item_id,split\n" + "".join(f"{u},{i},{s}\n" for u, i, s in rows))
    out = tmp_path / "out"
    m = ingest(src, out)
    assert raw_pairs(out).rows() == [
        (1, 11, "train"), (1, 12, "val"), (1, 13, "test"), (2, 11, "train"), (2, 12, "train"), (2, 13, "test"),
    ]
    assert m["filtered"]["duplicates"] == 4
    assert m["counts"]["rows"] == 6


def test_dedup_without_split(tmp_path):
    rows = ROWS + [ROWS[0], ROWS[0], ROWS[5]]
    src = write_csv(tmp_path / "d.csv", rows=rows)
    m = ingest(src, tmp_path / "out")
    assert m["counts"]["rows"] == 12
    assert m["filtered"]["duplicates"] == 3
    # the duplicate pair of user 40 does not rescue it from the <3 filter
    src2 = write_csv(tmp_path / "d2.csv", rows=ROWS + [ROWS[-1], ROWS[-1]])
    m2 = ingest(src2, tmp_path / "out2")
    assert m2["counts"]["users"] == 3 and m2["counts"]["dropped_users"] == 1


def test_min_rating(tmp_path):
    src = write_csv(tmp_path / "r.csv", rows=ROWS + [(20, 205, 1.0, 0), (20, 205, 4.5, 0)])
    out = tmp_path / "out"
    m = ingest(src, out, min_rating=4)
    kept = {(u, i) for u, i, r, _ in ROWS + [(20, 205, 4.5, 0)] if r >= 4}
    # user 10: (100, 301) -> 2 positives -> dropped; user 20: 100, 999, 205 -> kept; 30: 205, 420, 777
    assert raw_pairs(out).select("raw_user", "raw_item").rows() == sorted(
        (u, i) for u, i in kept if u in (20, 30)
    )
    assert m["min_rating"] == 4
    assert m["filtered"]["below_min_rating"] == 7
    assert m["counts"]["dropped_users"] == 2  # users 10 and 40
    no_rating = write_csv(tmp_path / "nr.csv", rows=[r[:2] for r in ROWS], header=("user_id", "item_id"))
    with pytest.raises(InputError, match="no rating column"):
        ingest(no_rating, tmp_path / "out2", min_rating=4)


def test_min_user_interactions_filter(tmp_path):
    src = write_csv(tmp_path / "r.csv")
    m = ingest(src, tmp_path / "out", min_user_interactions=4)
    assert m["counts"]["users"] == 2 and m["counts"]["dropped_users"] == 2
    assert m["min_user_interactions"] == 4


# --------------------------------------------------------------------------------------------
# determinism and atomic outputs


def test_determinism(inputs, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    ma = ingest(inputs["csv"], a, seed=1)
    mb = ingest(inputs["csv"], b, seed=1)
    mc = ingest(inputs["csv"], c, seed=2)
    for name in ("interactions.parquet", "user_map.parquet", "item_map.parquet", "manifest.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert ma == mb
    assert sha(a / "interactions.parquet") != sha(c / "interactions.parquet")
    assert sha(a / "user_map.parquet") == sha(c / "user_map.parquet")
    assert mc["seed"] == 2
    text = (a / "manifest.json").read_text()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"
    assert json.loads(text) == ma
    assert set(ma) == {
        "format_version", "input", "seed", "split_source", "min_rating", "min_user_interactions",
        "counts", "filtered", "outputs",
    }


def test_out_dir_exists_and_overwrite(inputs, tmp_path):
    out = tmp_path / "out"
    ingest(inputs["csv"], out, seed=1)
    before = sha(out / "interactions.parquet")
    with pytest.raises(InputError, match="already exists"):
        ingest(inputs["csv"], out, seed=2)
    assert sha(out / "interactions.parquet") == before
    ingest(inputs["csv"], out, seed=2, overwrite=True)
    assert sha(out / "interactions.parquet") != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_output_parent_is_created(inputs, tmp_path):
    out = tmp_path / "deep" / "er" / "out"
    ingest(inputs["tsv"], out)
    assert (out / "manifest.json").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["out"]


# --------------------------------------------------------------------------------------------
# bad input


def _bad(tmp_path: Path, name: str, content) -> Path:
    d = tmp_path / "in"
    d.mkdir(exist_ok=True)
    p = d / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content)
    return p


GOOD_DAT = "".join(f"{u}::{i}::{int(r)}::{t}\n" for u, i, r, t in ROWS)
GOOD_CSV = "user_id,item_id,rating\n" + "".join(f"{u},{i},{r}\n" for u, i, r, _ in ROWS)

BAD_CASES = {
    # id: (file name, content, [fragments the message must contain])
    "empty-csv": ("e.csv", "", ["file is empty"]),
    "empty-dat": ("ratings.dat", "", ["file is empty"]),
    "empty-parquet": ("e.parquet", "", ["file is empty"]),
    "blank-lines-only": ("ratings.dat", "\n\n\n", ["file is empty"]),
    "header-only": ("h.csv", "user_id,item_id,rating\n", ["no data rows"]),
    "missing-column": ("m.csv", "user_id,rating\n1,5\n", ["'item_id'", "not found"]),
    "non-integer-user": ("n.csv", "user_id,item_id\n1,2\nabc,3\n", ["line 3", "'user_id'", "'abc'"]),
    "non-integer-item": ("n.csv", "userId,movieId\n1,2\n1,3\n1,4.5\n", ["line 4", "'movieId'"]),
    "non-integer-dat": ("ratings.dat", "1::2::3::4\n1::x::3::4\n", ["line 2", "'MovieID'"]),
    "nan-rating": ("r.csv", "user_id,item_id,rating\n1,2,4\n1,3,5\n1,4,NaN\n", ["line 4", "NaN"]),
    "negative-rating": ("r.csv", "user_id,item_id,rating\n1,2,-1\n", ["line 2", "negative"]),
    "text-rating": ("r.tsv", "user_id\titem_id\trating\n1\t2\tgood\n", ["line 2", "'rating'", "not a number"]),
    "wrong-separator": ("s.csv", "user_id;item_id;rating\n1;2;3\n", ["'user_id'", "not found", "';'-separated",
                                                                   "wrong separator"]),
    "dat-as-csv": ("d.csv", "1::2::3::4\n", ["not found", "MovieLens"]),
    "truncated-dat": ("ratings.dat", GOOD_DAT + "5::12", [f"line {len(ROWS) + 1}", "truncated"]),
    "extra-fields-dat": ("ratings.dat", "1::2::3::4::5\n", ["line 1", "more than 4"]),
    "truncated-csv": ("t.csv", GOOD_CSV + "7", [f"line {len(ROWS) + 2}", "'item_id'", "missing"]),
    "truncated-csv-rating": ("t.csv", GOOD_CSV + "7,8", [f"line {len(ROWS) + 2}", "'rating'", "missing"]),
    "too-many-fields": ("t.csv", "user_id,item_id\n1,2\n1,3,4\n", ["line 3", "3 fields", "header has 2"]),
    "invalid-utf8": ("u.csv", b"user_id,item_id\n1,2\n1,\xff\xfe3\n", ["line 3", "UTF-8"]),
    "invalid-utf8-header": ("u.csv", b"us\xffer_id,item_id\n1,2\n", ["line 1", "UTF-8"]),
    "binary-garbage": ("g.csv", bytes(range(256)) * 4, ["binary"]),
    "garbage-parquet": ("g.parquet", b"not a parquet file at all\n", ["Parquet"]),
    "bad-split": ("s.csv", "user_id,item_id,split\n1,2,train\n1,3,validation\n", ["line 3", "'split'",
                                                                                   "'validation'"]),
    "one-user": ("o.csv", "user_id,item_id\n1,2\n1,3\n1,4\n2,2\n", ["only 1 user"]),
    "no-users": ("o.csv", "user_id,item_id\n1,2\n", ["only 0 user"]),
    "undetectable": ("noext", "hello world\n", ["cannot detect the format"]),
    # the fast typed read would accept these padded numbers: they must still be reported
    "space-padded-id": ("p.csv", "user_id,item_id\n1,2\n 1,3\n", ["line 3", "'user_id'", "' 1'"]),
    "tab-padded-id": ("p.csv", "user_id,item_id\n1,2\n1,\t3\n", ["line 3", "'item_id'", "'\\t3'"]),
    "space-padded-tsv": ("p.tsv", "user_id\titem_id\n1\t2\n1\t 2\n", ["line 3", "'item_id'",
                                                                       "' 2'"]),
    "quoted-padded-id": ("p.csv", 'user_id,item_id\n" 1",2\n', ["line 2", "'user_id'", "' 1'"]),
    "empty-id": ("e.csv", "user_id,item_id\n1,2\n,3\n", ["line 3", "'user_id'", "missing"]),
    "unclosed-quote": ("q.csv", 'user_id,item_id\n1,2\n3,"4\n5,6\n', ["line 3", "unclosed quote"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input(tmp_path, case):
    name, content, fragments = BAD_CASES[case]
    src = _bad(tmp_path, name, content)
    parent = tmp_path / "outputs"
    out = parent / "out"
    with pytest.raises(InputError) as info:
        ingest(src, out)
    message = str(info.value)
    assert "\n" not in message
    assert str(src) in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert_nothing_left(parent, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    # the check `infrec run` makes first: the same message, nothing written
    with pytest.raises(InputError) as checked:
        validate(src)
    assert str(checked.value) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_bad_parquet_values(tmp_path):
    parent = tmp_path / "outputs"
    p = tmp_path / "ids.parquet"
    pl.DataFrame({"user_id": ["1", "2", "x"], "item_id": [1, 2, 3]}).write_parquet(p)
    with pytest.raises(InputError, match=r"row 3: column 'user_id': 'x' is not an integer id"):
        ingest(p, parent / "out")
    p2 = tmp_path / "nulls.parquet"
    pl.DataFrame({"user_id": [1, 2, 3], "item_id": [1, None, 3]}).write_parquet(p2)
    with pytest.raises(InputError, match=r"row 2: column 'item_id': missing value"):
        ingest(p2, parent / "out")
    p3 = tmp_path / "float.parquet"
    pl.DataFrame({"user_id": [1.0, 2.0], "item_id": [1, 2]}).write_parquet(p3)
    with pytest.raises(InputError, match=r"'user_id' has type Float64"):
        ingest(p3, parent / "out")
    p4 = tmp_path / "nan.parquet"
    pl.DataFrame({"user_id": [1, 2], "item_id": [1, 2], "rating": [1.0, float("nan")]}).write_parquet(p4)
    with pytest.raises(InputError, match=r"row 2: column 'rating': rating is NaN"):
        ingest(p4, parent / "out")
    assert_nothing_left(parent, parent / "out")


def test_input_is_not_a_file(tmp_path):
    out = tmp_path / "o" / "out"
    with pytest.raises(InputError, match="is a directory"):
        ingest(tmp_path, out)
    with pytest.raises(InputError, match="no such file"):
        ingest(tmp_path / "missing.csv", out)
    link = tmp_path / "dangling.csv"
    link.symlink_to(tmp_path / "nowhere.csv")
    with pytest.raises(InputError, match=r"no such file \(broken symbolic link\)"):
        ingest(link, out)
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)  # would block a reader: must be refused before any open()
    with pytest.raises(InputError, match="not a regular file"):
        ingest(fifo, out)
    assert not (tmp_path / "o").exists()


def test_blank_lines_are_skipped(tmp_path):
    src = _bad(tmp_path, "ratings.dat", GOOD_DAT.replace("\n", "\n\n", 3) + "\n")
    m = ingest(src, tmp_path / "out")
    assert m["counts"]["rows"] == 12


def test_typed_and_text_reads_agree(tmp_path, monkeypatch):
    """A clean CSV/TSV is read with typed columns; a file with a space anywhere (here in an unused
    column) or a blank line takes the text path. Both give the same outputs."""
    text_reads = []
    validate = ingest_module._validate

    def spy(*args, **kwargs):
        text_reads.append(True)
        return validate(*args, **kwargs)

    monkeypatch.setattr(ingest_module, "_validate", spy)
    rng = np.random.default_rng(3)
    users, items, halves = (rng.integers(lo, hi, 800) for lo, hi in ((-20, 40), (0, 90), (0, 11)))
    lines = [f"{u},{i},{h / 2}" for u, i, h in zip(users, items, halves)]
    quoted = [f'"{x}"'.replace(",", '","') for x in lines]
    files = {
        "clean.csv": "user_id,item_id,rating\n" + "\n".join(lines) + "\n",
        "clean.tsv": "user_id\titem_id\trating\n" + "\n".join(x.replace(",", "\t") for x in lines),
        "quoted.csv": 'user_id,item_id,"rating"\r\n' + "\r\n".join(quoted),
        "spaces.csv": "title,user_id,item_id,rating\n" + "".join(f"a film,{x}\n" for x in lines),
        "blank.csv": "user_id,item_id,rating\n" + "\n\n".join(lines) + "\n",
    }
    hashes = {}
    for name, content in files.items():
        text_reads.clear()
        out = tmp_path / name
        m = ingest(_bad(tmp_path, name, content), out, seed=2, min_rating=1)
        assert m["counts"]["rows"] > 300
        assert bool(text_reads) == (name in ("spaces.csv", "blank.csv")), name
        hashes[name] = [sha(out / f) for f in ("interactions.parquet", "user_map.parquet",
                                               "item_map.parquet")]
    assert all(h == hashes["clean.csv"] for h in hashes.values()), hashes


def test_crlf_and_bom(tmp_path):
    src = _bad(tmp_path, "w.csv", "\ufeff" + GOOD_CSV.replace("\n", "\r\n"))
    m = ingest(src, tmp_path / "out")
    assert m["counts"]["rows"] == 12
    src2 = _bad(tmp_path, "ratings.dat", GOOD_DAT.replace("\n", "\r\n"))
    assert ingest(src2, tmp_path / "out2")["counts"]["rows"] == 12


# --------------------------------------------------------------------------------------------
# CLI

INFREC = Path(sys.executable).parent / "infrec"

from tests.helpers import clean_env  # noqa: E402 - the subprocesses get none of this session's env


def _stage_params(tmp_path: Path, src: Path, **ingest) -> Path:
    """A params file whose ingest stage reads ``src`` into ``tmp_path/outputs``."""
    path = tmp_path / "params.yaml"
    path.write_text(json.dumps({"state_dir": str(tmp_path / "outputs"),
                                "ingest": {"input": str(src), **ingest}}))
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "case,fragment",
    [("empty-csv", "file is empty"), ("missing-column", "'item_id'"), ("truncated-dat", "line 15"),
     ("wrong-separator", "wrong separator")],
)
def test_cli_bad_input(tmp_path, case, fragment):
    name, content, _ = BAD_CASES[case]
    src = _bad(tmp_path, name, content)
    proc = subprocess.run([str(INFREC), "ingest", "--params", str(_stage_params(tmp_path, src))],
                          capture_output=True, text=True, timeout=60, env=clean_env())
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and str(src) in lines[0] and fragment in lines[0]
    assert "Traceback" not in proc.stderr
    processed = tmp_path / "outputs" / "data" / "processed"
    assert_nothing_left(processed.parent, processed)


@pytest.mark.slow
def test_cli_directory_input_and_success(tmp_path):
    proc = subprocess.run([str(INFREC), "ingest", "--params",
                           str(_stage_params(tmp_path, tmp_path))],
                          capture_output=True, text=True, timeout=60, env=clean_env())
    assert proc.returncode == 2 and "is a directory" in proc.stderr
    assert not (tmp_path / "outputs" / "data" / "processed").exists()
    src = write_csv(tmp_path / "ok.csv")
    proc = subprocess.run([str(INFREC), "ingest", "-q", "--params",
                           str(_stage_params(tmp_path, src, seed=4))],
                          capture_output=True, text=True, timeout=60, env=clean_env())
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["counts"]["rows"] == 12
    out = tmp_path / "outputs" / "data" / "processed"
    assert json.loads((out / "manifest.json").read_text())["seed"] == 4
    # the snapshot holds the exact bytes that were ingested
    assert (tmp_path / "outputs" / "data" / "input" / "ok.csv").read_bytes() == src.read_bytes()


# --------------------------------------------------------------------------------------------
# real data


@pytest.mark.realdata
def test_ml1m_keeps_its_split(ml1m_path, tmp_path):
    out = tmp_path / "ml1m"
    m = ingest(ml1m_path, out)
    assert m["split_source"] == "file"
    assert m["counts"] == {
        "rows": 1_000_209, "users": 6_040, "items": 3_706,
        "train": 791_718, "val": 99_692, "test": 108_799, "dropped_users": 0,
    }
    it = read(out)
    assert it.height == 1_000_209
    assert it["user"].max() == 6_039 and it["item"].max() == 3_706 - 1
    src = pl.read_parquet(ml1m_path).with_columns(pl.col("split").cast(pl.String))
    assert raw_pairs(out).rows() == src.select("user_id", "item_id", "split").sort("user_id", "item_id").rows()


@pytest.mark.realdata
def test_random_split_reproduces_the_reference_counts(ml1m_path, tmp_path):
    """Dropping ML-1M's split column and re-splitting gives the reference per-user counts."""
    src = tmp_path / "nosplit.parquet"
    ref = pl.read_parquet(ml1m_path).with_columns(pl.col("split").cast(pl.String))
    ref.drop("split").write_parquet(src)
    out = tmp_path / "out"
    m = ingest(src, out, seed=11)
    assert m["split_source"] == "random"
    assert {k: m["counts"][k] for k in ("train", "val", "test")} == {
        "train": 791_718, "val": 99_692, "test": 108_799,
    }
    mine = raw_pairs(out).group_by("raw_user", "split").len().sort("raw_user", "split")
    theirs = ref.group_by("user_id", "split").len().sort("user_id", "split")
    assert mine.rows() == theirs.rows()


def test_bad_arguments(inputs, tmp_path):
    with pytest.raises(InputError, match="seed"):
        ingest(inputs["csv"], tmp_path / "o", seed=-1)
    with pytest.raises(InputError, match="unknown column role"):
        ingest(inputs["csv"], tmp_path / "o", columns={"usr": "userId"})
    with pytest.raises(InputError, match="no rows left"):
        ingest(inputs["csv"], tmp_path / "o", min_rating=6)
    assert not (tmp_path / "o").exists()
