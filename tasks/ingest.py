"""Ingest raw interactions into the project's canonical, split, re-indexed form.

``ingest(input_path, out_dir, ...)`` reads MovieLens ``ratings.dat``, CSV/TSV (with a header) or
Parquet, validates it, and writes ``interactions.parquet``, ``user_map.parquet``,
``item_map.parquet`` and ``manifest.json`` into ``out_dir`` atomically.

Pipeline (see docs/algorithms.md, "Data and protocol"):

1. validate schema and types (bad input -> ``InputError`` naming the file and the line/row and
   column; blank lines are skipped);
2. ``min_rating``: rows with ``rating < min_rating`` are dropped *before* de-duplication, so a
   (user, item) pair is a positive if any of its occurrences passes the threshold;
3. de-duplicate (user, item) pairs: one row is kept; with a split column, the row with the
   earliest split in the order train < val < test is kept;
4. implicit binarisation: every remaining interaction is a positive (ratings are not written);
5. drop users with fewer than ``min_user_interactions`` interactions (their total count, also
   when the file has a split column);
6. split: the file's ``split`` column as is (users without train rows are kept), or the paper's
   random protocol with ``seed`` (see ``random_split``: it reproduces the reference ML-1M split's
   per-user counts exactly);
7. contiguous re-indexing: users by sorted raw id -> 0..U-1, items by sorted raw id -> 0..I-1,
   over the kept rows only.

Same input + seed => byte-identical outputs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import secrets
import shutil
import stat
from pathlib import Path

import numpy as np
import polars as pl

from tasks.errors import InputError

FORMATS = ("movielens", "csv", "tsv", "parquet")
SPLITS = ("train", "val", "test")
_SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}
_EXTENSIONS = {".dat": "movielens", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet"}
_SEPARATORS = {"csv": ",", "tsv": "\t"}
_ROLES = ("user", "item", "rating", "timestamp", "split")
_DEFAULT_NAMES = {"user": "user_id", "item": "item_id", "rating": "rating", "timestamp": "timestamp", "split": "split"}
# Compared after lower-casing and removing "_" (so userId, UserID, user_id all match "userid").
_ALIASES = {
    "user": ("user_id", "userId", "UserID", "user", "uid"),
    "item": ("item_id", "itemId", "movieId", "MovieID", "movie_id", "item", "iid"),
    "rating": ("rating", "score"),
    "timestamp": ("timestamp", "ts", "time"),
    "split": ("split",),
}
_ML_FIELDS = ("user", "item", "rating", "timestamp")
_ML_LAYOUT = "UserID::MovieID::Rating::Timestamp"
_HEAD_BYTES = 1 << 16
FORMAT_VERSION = 1


def ingest(
    input_path,
    out_dir,
    *,
    fmt: str | None = None,
    seed: int = 0,
    min_rating: float | None = None,
    columns: dict[str, str] | None = None,
    overwrite: bool = False,
    min_user_interactions: int = 3,
) -> dict:
    """Validate, de-duplicate, binarise, filter, split and re-index ``input_path`` into ``out_dir``.

    ``fmt``: "movielens", "csv", "tsv" or "parquet" (default: by extension, else by sniffing).
    ``columns``: role ("user", "item", "rating", "timestamp", "split") -> column name, for CSV/TSV
    and Parquet (ignored for ratings.dat); unnamed roles are found by their usual aliases.
    Returns the manifest (also written as ``out_dir/manifest.json``). Raises ``InputError`` with
    a one-line message on bad input; in that case nothing is left on disk.
    """
    src = str(input_path)
    input_path = Path(input_path)
    out_dir = Path(out_dir)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    if min_user_interactions < 1:
        raise InputError(f"min_user_interactions must be >= 1, got {min_user_interactions}")
    if min_rating is not None and not np.isfinite(min_rating):
        raise InputError(f"min_rating must be a finite number, got {min_rating}")
    if columns:
        unknown = sorted(set(columns) - set(_ROLES))
        if unknown:
            raise InputError(f"unknown column role(s) {unknown}; expected some of {list(_ROLES)}")
    _check_input_file(input_path, src)
    if (out_dir.exists() or out_dir.is_symlink()) and not overwrite:
        raise InputError(f"{out_dir}: output directory already exists (use --overwrite to replace it)")

    detected = detect_format(input_path, fmt, src)
    df = _load(input_path, detected, columns or {}, src)
    tables, counts, filtered, split_source = _process(df, src, seed, min_rating, min_user_interactions)

    sha = _sha256(input_path, src)
    manifest = {
        "format_version": FORMAT_VERSION,
        "input": {"path": src, "sha256": sha, "format": detected},
        "seed": seed,
        "split_source": split_source,
        "min_rating": min_rating,
        "min_user_interactions": min_user_interactions,
        "counts": counts,
        "filtered": filtered,
    }
    manifest["outputs"] = _write_outputs(out_dir, tables, manifest, overwrite)
    return manifest


# --------------------------------------------------------------------------------------------
# input checks and format detection


def _check_input_file(path: Path, src: str) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        hint = " (broken symbolic link)" if path.is_symlink() else ""
        raise InputError(f"{src}: no such file{hint}") from None
    except OSError as exc:
        raise InputError(f"{src}: cannot access file: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{src}: is a directory, expected an interactions file")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{src}: is not a regular file")
    if st.st_size == 0:
        raise InputError(f"{src}: file is empty")
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise InputError(f"{src}: cannot read file: {exc.strerror or exc}") from None


def _read_head(path: Path, src: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(_HEAD_BYTES)
    except OSError as exc:
        raise InputError(f"{src}: cannot read file: {exc.strerror or exc}") from None


def _first_line(head: bytes) -> bytes:
    return head.split(b"\n", 1)[0].rstrip(b"\r")


def detect_format(path, fmt: str | None = None, src: str | None = None) -> str:
    """Return one of ``FORMATS``: ``fmt`` if given, else by extension, else by sniffing line 1."""
    path = Path(path)
    src = src if src is not None else str(path)
    if fmt is not None:
        fmt = fmt.lower()
        if fmt not in FORMATS:
            raise InputError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
        return fmt
    by_ext = _EXTENSIONS.get(path.suffix.lower())
    if by_ext:
        return by_ext
    head = _read_head(path, src)
    if head.startswith(b"PAR1"):
        return "parquet"
    line = _first_line(head)
    if b"::" in line:
        return "movielens"
    if b"\t" in line:
        return "tsv"
    if b"," in line:
        return "csv"
    raise InputError(
        f"{src}: cannot detect the format from the extension or line 1; use --format "
        f"({', '.join(FORMATS)})"
    )


# --------------------------------------------------------------------------------------------
# loading: every format gives an eager frame with user/item Int64, rating Float64, split String


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "")


def _resolve_columns(names: list[str], columns: dict[str, str], src: str, sep: str | None, head: bytes | None):
    """Map roles -> column names present in ``names``; errors name the missing column."""
    resolved: dict[str, str] = {}
    for role in _ROLES:
        if role in columns:
            wanted = columns[role]
            if wanted not in names:
                raise InputError(
                    f"{src}: column {wanted!r} (given for {role}) not found; "
                    f"columns are: {_show_names(names)}{_separator_hint(names, sep, head)}"
                )
            resolved[role] = wanted
            continue
        by_norm: dict[str, str] = {}
        for n in names:
            by_norm.setdefault(_norm(n), n)
        for alias in _ALIASES[role]:
            if _norm(alias) in by_norm:
                resolved[role] = by_norm[_norm(alias)]
                break
    for role in ("user", "item"):
        if role not in resolved:
            raise InputError(
                f"{src}: expected column {_DEFAULT_NAMES[role]!r} not found (also tried "
                f"{', '.join(_ALIASES[role][1:])}); columns are: {_show_names(names)}"
                f"{_separator_hint(names, sep, head)}"
            )
    used = [resolved[r] for r in resolved]
    if len(set(used)) != len(used):
        raise InputError(f"{src}: the same column is used for two roles: {resolved}")
    return resolved


def _show_names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:20])
    return shown + (", ..." if len(names) > 20 else "")


def _separator_hint(names: list[str], sep: str | None, head: bytes | None) -> str:
    if sep is None:
        return ""
    line = _first_line(head or b"").decode("utf-8", "replace")
    if "::" in line:
        return " (line 1 contains '::': this looks like MovieLens ratings.dat; use --format movielens)"
    if len(names) == 1:
        for cand, label in ((";", "';'"), ("\t", "tab"), (",", "','"), ("|", "'|'")):
            if cand != sep and cand in line:
                expected = "','" if sep == "," else "tab"
                return f" (the header looks {label}-separated, not {expected}-separated: wrong separator?)"
    return ""


def _check_text_head(path: Path, src: str, what: str) -> bytes:
    head = _read_head(path, src)
    if not head.strip():
        raise InputError(f"{src}: file is empty")
    if head.startswith(b"PAR1"):
        raise InputError(f"{src}: looks like a Parquet file, not {what}; use --format parquet or a .parquet name")
    if b"\x00" in head:
        raise InputError(f"{src}: looks like a binary file, not {what} text")
    try:
        _first_line(head).decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{src}: line 1: not valid UTF-8 text (binary file or wrong encoding?)") from None
    return head


def _load(path: Path, fmt: str, columns: dict[str, str], src: str) -> pl.DataFrame:
    if fmt == "movielens":
        head = _check_text_head(path, src, "MovieLens ratings.dat")
        raw = (
            pl.scan_csv(
                path, has_header=False, separator="\x1f", quote_char=None, schema={"line": pl.String}
            )
            .select(pl.col("line").str.split_exact("::", 4))
            .unnest("line")
            .rename({f"field_{i}": n for i, n in enumerate((*_ML_FIELDS, "extra"))})
        )
        names = {"user": "UserID", "item": "MovieID", "rating": "Rating", "timestamp": "Timestamp"}
        return _validate(raw, names, dtypes=None, src=src, where="line", offset=1, fmt=fmt, sep=None,
                         path=path)
    if fmt in ("csv", "tsv"):
        sep = _SEPARATORS[fmt]
        what = "CSV" if fmt == "csv" else "TSV"
        head = _check_text_head(path, src, what)
        try:
            lf = pl.scan_csv(path, separator=sep, has_header=True, infer_schema=False, quote_char='"')
            header = lf.collect_schema().names()
        except pl.exceptions.PolarsError as exc:
            raise InputError(f"{src}: line 1: cannot read the header: {_first(exc)}") from None
        resolved = _resolve_columns(header, columns, src, sep, head)
        resolved.pop("timestamp", None)  # not used downstream: not validated for CSV/TSV
        raw = lf.select([pl.col(c).alias(r) for r, c in resolved.items()])
        names = {r: c for r, c in resolved.items()}
        return _validate(raw, names, dtypes=None, src=src, where="line", offset=2, fmt=fmt, sep=sep,
                         path=path, n_header=len(header))
    # parquet
    try:
        lf = pl.scan_parquet(path)
        schema = lf.collect_schema()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputError(f"{src}: not a readable Parquet file: {_first(exc)}") from None
    resolved = _resolve_columns(schema.names(), columns, src, None, None)
    resolved.pop("timestamp", None)
    raw = lf.select([pl.col(c).alias(r) for r, c in resolved.items()])
    dtypes = {r: schema[c] for r, c in resolved.items()}
    return _validate(raw, resolved, dtypes=dtypes, src=src, where="row", offset=1, fmt=fmt, sep=None)


def _first(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _typed(role: str, dtype, src: str, colname: str):
    """(value expression, bad-row expression) for one role from a raw column of ``dtype``."""
    c = pl.col(role)
    if role in ("user", "item", "timestamp"):
        if dtype is None or dtype == pl.String:
            v = c.cast(pl.Int64, strict=False)
        elif dtype.is_integer():
            v = c.cast(pl.Int64, strict=False)
        else:
            raise InputError(f"{src}: column {colname!r} has type {dtype}, expected integer ids")
        return v, v.is_null()
    if role == "rating":
        if dtype is None or dtype == pl.String or dtype.is_numeric():
            v = c.cast(pl.Float64, strict=False)
        else:
            raise InputError(f"{src}: column {colname!r} has type {dtype}, expected numeric ratings")
        return v, v.is_null() | ~v.is_finite() | (v < 0)
    if role == "split":
        if dtype is None or dtype == pl.String or isinstance(dtype, (pl.Categorical, pl.Enum)):
            v = c.cast(pl.String).replace_strict(_SPLIT_ORDER, default=None, return_dtype=pl.Int8)
        else:
            raise InputError(f"{src}: column {colname!r} has type {dtype}, expected train/val/test strings")
        return v, v.is_null()  # split codes: 0 train, 1 val, 2 test
    raise AssertionError(role)


def _validate(raw: pl.LazyFrame, names: dict[str, str], *, dtypes, src, where, offset, fmt, sep,
              path: Path | None = None, n_header: int = 0) -> pl.DataFrame:
    """Cast ``raw`` (role-named columns) and check every row; errors name the line/row and column.

    One lazy pass computes the typed columns and an Int8 ``_err`` code per row (-1 blank line,
    0 ok, k>0: the k-th check failed). Only on error is the offending row read again, as text.
    """
    text = dtypes is None
    roles = [r for r in ("user", "item", "rating", "split") if r in names]
    checks: list[tuple[str, pl.Expr]] = []
    values: dict[str, pl.Expr] = {}
    if fmt == "movielens":
        checks.append(("fields", pl.col("timestamp").is_null() | pl.col("extra").is_not_null()))
    for role in roles + (["timestamp"] if fmt == "movielens" else []):
        v, bad = _typed(role, None if text else dtypes[role], src, names.get(role, role))
        checks.append((role, bad))
        if role != "timestamp":
            values[role] = v
    if text:
        blank_cols = ["user"] if fmt == "movielens" else roles  # a blank line is all nulls
        blank = pl.all_horizontal([pl.col(c).is_null() for c in blank_cols])
    else:
        blank = pl.lit(False)
    err = pl.when(blank).then(pl.lit(-1, pl.Int8))
    for k, (_, bad) in enumerate(checks, start=1):
        err = err.when(bad).then(pl.lit(k, pl.Int8))
    err = err.otherwise(pl.lit(0, pl.Int8)).alias("_err")
    query = raw.select([*(v.alias(r) for r, v in values.items()), err])
    try:
        df = query.collect()
    except pl.exceptions.PolarsError as exc:
        if text and path is not None:
            located = _locate_text_problem(path, fmt, sep, n_header)
            if located:
                raise InputError(f"{src}: {located}") from None
        raise InputError(f"{src}: cannot parse file: {_first(exc)}") from None
    errs = df.get_column("_err")
    if errs.max() is not None and errs.max() > 0:
        idx = int((errs > 0).arg_max())
        role = checks[int(errs[idx]) - 1][0]
        row = raw.slice(idx, 1).collect().row(0, named=True)
        raise InputError(f"{src}: {where} {idx + offset}: {_describe(role, row, names, fmt)}")
    df = df.filter(pl.col("_err") == 0).drop("_err")
    if df.height == 0:
        raise InputError(f"{src}: no data rows" + (" (only a header)" if fmt in ("csv", "tsv") else ""))
    return df


def _short(value) -> str:
    s = repr(value)
    return s if len(s) <= 40 else s[:37] + "..."


def _describe(role: str, row: dict, names: dict[str, str], fmt: str) -> str:
    if role == "fields":
        n = sum(row[f] is not None for f in _ML_FIELDS)
        if row.get("extra") is not None:
            return f"more than 4 '::'-separated fields, expected {_ML_LAYOUT}"
        return f"only {n} '::'-separated field(s), expected 4 ({_ML_LAYOUT}): truncated line?"
    col = names.get(role, role)
    value = row.get(role)
    label = f"column {col!r}"
    if value is None:
        return f"{label}: missing value" + (" (truncated line?)" if fmt in ("csv", "tsv") else "")
    if role in ("user", "item", "timestamp"):
        return f"{label}: {_short(value)} is not an integer id"
    if role == "rating":
        try:
            x = float(value)
        except (TypeError, ValueError):
            return f"{label}: {_short(value)} is not a number"
        if x != x:
            return f"{label}: rating is NaN"
        if x in (float("inf"), float("-inf")):
            return f"{label}: rating is infinite"
        return f"{label}: rating {_short(value)} is negative (ratings must be >= 0)"
    if role == "split":
        return f"{label}: invalid split {_short(value)} (expected train, val or test)"
    return f"{label}: invalid value {_short(value)}"


def _locate_text_problem(path: Path, fmt: str, sep: str | None, n_header: int) -> str | None:
    """Slow pass, error path only: find the first line that is not UTF-8 or has too many fields."""
    try:
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    return f"line {lineno}: not valid UTF-8 text (binary data or wrong encoding?)"
                if fmt in ("csv", "tsv") and lineno > 1:
                    line = line.rstrip("\r\n")
                    if not line:
                        continue
                    fields = next(csv.reader([line], delimiter=sep))
                    if len(fields) > n_header:
                        return f"line {lineno}: {len(fields)} fields but the header has {n_header}"
    except OSError as exc:
        return f"cannot read file: {exc.strerror or exc}"
    return None


# --------------------------------------------------------------------------------------------
# processing


def random_split(users: np.ndarray, seed: int) -> np.ndarray:
    """The paper's split for rows sorted by (user, item); returns codes 0=train, 1=val, 2=test.

    Per user (n rows), the rows are shuffled by keys ``default_rng(seed).random(len(users))``;
    with i = 0..n-1 the position in that shuffled order: i = 0 is forced into test; for i >= 1,
    i < 0.8(n-1) -> train, i < 0.9(n-1) -> val, else test (compared in integers: 10i < 8(n-1),
    10i < 9(n-1)). Counting i over the whole shuffled list (not from 0 after the forced item) is
    what the reference split of ML-1M does: its per-user train/val/test counts match this rule
    for all 6,040 users.
    """
    users = np.asarray(users)
    n = len(users)
    if n == 0:
        return np.zeros(0, dtype=np.int8)
    keys = np.random.default_rng(seed).random(n)
    change = np.empty(n, dtype=bool)
    change[0] = True
    np.not_equal(users[1:], users[:-1], out=change[1:])
    group = np.cumsum(change) - 1  # group of each row (rows are sorted by user)
    starts = np.flatnonzero(change)
    sizes = np.diff(np.append(starts, n))
    shift = 63 - max(1, int(group[-1]).bit_length())
    if shift >= 32:
        # one int64 sort: group in the high bits, the key's top `shift` bits below (ties, which
        # are vanishingly rare, fall back to row order: still deterministic)
        order = np.argsort((group << shift) | np.floor(keys * float(1 << shift)).astype(np.int64), kind="stable")
    else:  # pragma: no cover - more than 2^31 users
        order = np.lexsort((keys, group))
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n) - starts[group[order]]
    cnt = sizes[group].astype(np.int64)
    code = np.full(n, 2, dtype=np.int8)
    code[(pos > 0) & (10 * pos < 9 * (cnt - 1))] = 1
    code[(pos > 0) & (10 * pos < 8 * (cnt - 1))] = 0
    return code


def _dense(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique values, index of each value in them); O(n) when the ids are compact."""
    lo, hi = int(values.min()), int(values.max())
    span = hi - lo + 1
    if span <= max(4 * len(values), 1 << 24):
        shifted = values - lo
        present = np.zeros(span, dtype=bool)
        present[shifted] = True
        lut = np.cumsum(present, dtype=np.int64) - 1
        return np.flatnonzero(present).astype(np.int64) + lo, lut[shifted]
    series = pl.Series(values)
    return series.unique().sort().to_numpy(), (series.rank("dense") - 1).cast(pl.Int64).to_numpy()


def _first_of_runs(sorted_keys: np.ndarray) -> np.ndarray:
    keep = np.empty(len(sorted_keys), dtype=bool)
    keep[:1] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=keep[1:])
    return keep


def _process(df: pl.DataFrame, src: str, seed: int, min_rating, min_user_interactions: int):
    input_rows = df.height
    below = 0
    if min_rating is not None:
        if "rating" not in df.columns:
            raise InputError(f"{src}: min_rating given but the file has no rating column")
        df = df.filter(pl.col("rating") >= min_rating)
        below = input_rows - df.height
    has_split = "split" in df.columns
    if df.height == 0:
        raise InputError(f"{src}: no rows left with rating >= {min_rating}")
    raw_u = df.get_column("user").to_numpy()
    raw_i = df.get_column("item").to_numpy()
    split = df.get_column("split").to_numpy().astype(np.int64) if has_split else None
    del df
    u_raw_ids, u = _dense(raw_u)
    i_raw_ids, i = _dense(raw_i)
    n_items = len(i_raw_ids)
    if len(u_raw_ids) * n_items * 3 >= 1 << 62:  # pragma: no cover - astronomically sparse ids
        order = np.lexsort((split if has_split else i, i, u))
        u, i = u[order], i[order]
        split = split[order] if has_split else None
        keep = _first_of_runs(u) | _first_of_runs(i)
        u, i = u[keep], i[keep]
        split = split[keep] if has_split else None
    else:
        # de-duplicate with one integer sort; with a split column the smallest code (train < val
        # < test) of each (user, item) comes first and is kept
        key = u * n_items + i
        if has_split:
            key = key * 3 + split
            key.sort()
            keep = _first_of_runs(key // 3)
            key = key[keep]
            split, key = key % 3, key // 3
        else:
            key.sort()
            key = key[_first_of_runs(key)]
        u, i = key // n_items, key % n_items
        del key
    duplicates = input_rows - below - len(u)

    per_user = np.bincount(u, minlength=len(u_raw_ids))
    users_before = int((per_user > 0).sum())
    keep_user = per_user >= min_user_interactions
    users = int(keep_user.sum())
    if users < 2:
        raise InputError(
            f"{src}: only {users} user(s) with >= {min_user_interactions} interactions after "
            f"filtering; need at least 2"
        )
    rows_before = len(u)
    kept = keep_user[u]
    u, i = u[kept], i[kept]
    # contiguous re-indexing over the kept rows (monotone: rows stay sorted by user, item)
    u = (np.cumsum(keep_user) - 1)[u]
    item_present = np.bincount(i, minlength=n_items) > 0
    i = (np.cumsum(item_present) - 1)[i]
    user_ids, item_ids = u_raw_ids[keep_user], i_raw_ids[item_present]

    if has_split:
        codes = split[kept].astype(np.int8)
        split_source = "file"
    else:
        codes = random_split(u, seed)
        split_source = "random"
    interactions = pl.DataFrame(
        {
            "user": pl.Series(u, dtype=pl.Int32),
            "item": pl.Series(i, dtype=pl.Int32),
            "split": pl.Series(SPLITS, dtype=pl.String).gather(codes),
        }
    )
    user_map = pl.DataFrame({"user": pl.Series(np.arange(len(user_ids)), dtype=pl.Int32),
                             "raw_id": pl.Series(user_ids, dtype=pl.Int64)})
    item_map = pl.DataFrame({"item": pl.Series(np.arange(len(item_ids)), dtype=pl.Int32),
                             "raw_id": pl.Series(item_ids, dtype=pl.Int64)})
    bincount = np.bincount(codes, minlength=3)
    counts = {
        "rows": interactions.height,
        "users": len(user_ids),
        "items": len(item_ids),
        "train": int(bincount[0]),
        "val": int(bincount[1]),
        "test": int(bincount[2]),
        "dropped_users": users_before - users,
    }
    filtered = {
        "input_rows": input_rows,
        "below_min_rating": below,
        "duplicates": duplicates,
        "rows_of_dropped_users": rows_before - interactions.height,
    }
    tables = {"interactions.parquet": interactions, "user_map.parquet": user_map, "item_map.parquet": item_map}
    return tables, counts, filtered, split_source


# --------------------------------------------------------------------------------------------
# outputs


def _sha256(path: Path, src: str | None = None) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError as exc:
        raise InputError(f"{src or path}: cannot read file: {exc.strerror or exc}") from None
    return h.hexdigest()


def _write_outputs(out_dir: Path, tables: dict[str, pl.DataFrame], manifest: dict, overwrite: bool) -> dict:
    """Write into ``.{name}.tmp-XXXX`` beside ``out_dir``, then rename; on error remove it."""
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".{out_dir.name}.tmp-{secrets.token_hex(4)}"
        tmp.mkdir()
    except OSError as exc:
        raise InputError(f"{out_dir}: cannot create the output directory: {exc.strerror or exc}") from None
    old: Path | None = None
    try:
        outputs = {}
        for name, table in tables.items():
            target = tmp / name
            table.write_parquet(target, compression="zstd", compression_level=3, statistics=True)
            outputs[name] = _sha256(target)
        manifest["outputs"] = outputs
        (tmp / "manifest.json").write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n")
        if out_dir.exists() or out_dir.is_symlink():
            if not overwrite:
                raise InputError(f"{out_dir}: output directory already exists (use --overwrite to replace it)")
            old = parent / f".{out_dir.name}.old-{secrets.token_hex(4)}"
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out_dir.exists():
            os.rename(old, out_dir)  # put the previous output back
            old = None
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    return outputs
