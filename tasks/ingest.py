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
5. split: a file with a ``split`` column is used as is — after exact duplicates collapse nothing
   else is dropped (every user with any row is kept, also one without train rows); otherwise
   infrec draws the paper's random split with ``seed`` (see ``random_split``: it reproduces the
   reference ML-1M split's per-user counts exactly) over the users with at least
   ``min_user_interactions`` distinct interactions (the paper's protocol: 3), the others dropped;
6. contiguous re-indexing: users by sorted raw id -> 0..U-1, items by sorted raw id -> 0..I-1,
   over the kept rows only.

Same input content + parameters => byte-identical outputs, wherever the input lies: the manifest
records the input's base name, size and SHA-256, never its path (so a data version does not depend
on where the repository is checked out).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl

from tasks.errors import InputError
from tasks.io import atomic_dir, sha256_file
from tasks.runtime import fault_point, say, task_options

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
    label: str | None = None,
) -> dict:
    """Validate, de-duplicate, binarise, filter, split and re-index ``input_path`` into ``out_dir``.

    ``fmt``: "movielens", "csv", "tsv" or "parquet" (default: by extension, else by sniffing).
    ``columns``: role ("user", "item", "rating", "timestamp", "split") -> column name, for CSV/TSV
    and Parquet (ignored for ratings.dat); unnamed roles are found by their usual aliases.
    ``min_user_interactions``: users with fewer distinct interactions are dropped before infrec
    draws the split; not applied to a file that brings its own ``split`` column (kept as is).
    Returns the manifest (also written as ``out_dir/manifest.json``). Raises ``InputError`` with
    a one-line message on bad input; in that case nothing is left on disk. ``label``: how error
    messages name the input (default: its path), e.g. the user's file when reading a snapshot.
    """
    src = label or str(input_path)
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
    with ThreadPoolExecutor(max_workers=1) as pool:  # hash the input while its rows are processed
        hashing = pool.submit(sha256_file, input_path, src)
        processed = _process(df, src, seed, min_rating, min_user_interactions)
        sha = hashing.result()
    tables, counts, filtered, split_source = processed
    manifest = {
        "format_version": FORMAT_VERSION,
        # the file's name, size and content, never its path: the data hash must not depend on
        # where the file or the checkout lies
        "input": {"name": Path(src).name, "size": input_path.stat().st_size, "sha256": sha,
                  "format": detected},
        "seed": seed,
        "split_source": split_source,
        "min_rating": min_rating,
        # applied only to a split infrec draws (null: the file's own split, used as is)
        "min_user_interactions": None if split_source == "file" else min_user_interactions,
        "counts": counts,
        "filtered": filtered,
    }
    manifest["outputs"] = _write_outputs(out_dir, tables, manifest, overwrite)
    return manifest


def validate(input_path, *, fmt: str | None = None, seed: int = 0, min_rating: float | None = None,
             columns: dict[str, str] | None = None, min_user_interactions: int = 3,
             label: str | None = None) -> dict:
    """Parse and check the whole of ``input_path`` exactly as :func:`ingest` would — every row,
    the filters, the users left — and write nothing. Returns the counts; raises the same one-line
    :class:`InputError` (naming the file and the line or column of the first problem). What
    ``infrec run`` calls before it touches ``params.yaml``, starts a server or writes a file."""
    src = label or str(input_path)
    input_path = Path(input_path)
    _check_input_file(input_path, src)
    detected = detect_format(input_path, fmt, src)
    df = _load(input_path, detected, columns or {}, src)
    _, counts, _, _ = _process(df, src, seed, min_rating, min_user_interactions)
    return {"format": detected, "counts": counts}


def validate_params_input(params, path=None) -> dict | None:
    """:func:`validate` of the file the ingest stage would read with ``params`` (``path``
    overrides ``ingest.input``); None for the embedded default (nothing to check)."""
    ing = params.ingest
    if path is None and ing.input is None:
        return None
    source = Path(path).expanduser().resolve() if path is not None else params.input_path()
    columns = {role: name for role, name in (("user", ing.user_col), ("item", ing.item_col),
                                              ("rating", ing.rating_col)) if name}
    return validate(source, fmt=ing.format, seed=ing.seed, min_rating=ing.min_rating,
                    columns=columns or None, min_user_interactions=ing.min_user_interactions,
                    label=str(path if path is not None else source))


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
            lf = _scan_delimited(path, sep)
            header = lf.collect_schema().names()
        except pl.exceptions.PolarsError as exc:
            raise InputError(f"{src}: line 1: cannot read the header: {_first(exc)}") from None
        resolved = _resolve_columns(header, columns, src, sep, head)
        resolved.pop("timestamp", None)  # not used downstream: not validated for CSV/TSV
        typed = _read_typed(path, sep, resolved, src)  # fast path for a clean file
        if typed is not None:
            return typed
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


def _scan_delimited(path: Path, sep: str, types: dict | None = None) -> pl.LazyFrame:
    """CSV/TSV with a header; every column is text except those given in ``types``."""
    return pl.scan_csv(path, separator=sep, has_header=True, infer_schema=False, quote_char='"',
                       schema_overrides=types)


# CSV/TSV fast path: roles the reader parses itself (the text path reads strings and casts them)
_PARSED_TYPES = {"user": pl.Int64, "item": pl.Int64, "rating": pl.Float64}


def _read_typed(path: Path, sep: str, resolved: dict[str, str], src: str) -> pl.DataFrame | None:
    """Fast path for a clean CSV/TSV: ids and ratings parsed by the reader, then checked.

    Gives the same frame as ``_validate`` on the text columns, or None to leave the file to that
    text path, which finds the first bad line and reports it: on a value the reader cannot parse,
    any null (empty field, short or blank line), a failed check, or no data rows. The reader skips
    spaces and tabs before a number, which the text path rejects: a file with a space (or, in a
    CSV, a tab) anywhere is left to the text path too.
    """
    if _contains_any_byte(path, b" " if sep == "\t" else b" \t", src):
        return None
    types = {c: _PARSED_TYPES[r] for r, c in resolved.items() if r in _PARSED_TYPES}
    lf = _scan_delimited(path, sep, types)
    parts = {r: _typed(r, _PARSED_TYPES.get(r, pl.String), src, c) for r, c in resolved.items()}
    query = lf.select([pl.col(c).alias(r) for r, c in resolved.items()]).select(
        [*(v.alias(r) for r, (v, _) in parts.items()),
         pl.any_horizontal([bad for _, bad in parts.values()]).alias("_bad")]
    )
    try:
        df = query.collect()
    except pl.exceptions.PolarsError:
        return None
    if df.height == 0 or df.get_column("_bad").any():
        return None
    return df.drop("_bad")


def _contains_any_byte(path: Path, values: bytes, src: str) -> bool:
    """Whether the file contains any of the bytes in ``values`` (one chunked pass)."""
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                if any(v in chunk for v in values):
                    return True
    except OSError as exc:
        raise InputError(f"{src}: cannot read file: {exc.strerror or exc}") from None
    return False


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
    quoted_from = 0  # the line whose '"' opened a quoted field not closed yet (0: none open)
    try:
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    return f"line {lineno}: not valid UTF-8 text (binary data or wrong encoding?)"
                if fmt not in ("csv", "tsv"):
                    continue
                opened_before = quoted_from
                if line.count('"') % 2:  # a quoted field opens (or closes) on this line
                    quoted_from = 0 if quoted_from else lineno
                if lineno > 1 and not opened_before and not quoted_from:
                    line = line.rstrip("\r\n")
                    if not line:
                        continue
                    fields = next(csv.reader([line], delimiter=sep))
                    if len(fields) > n_header:
                        return f"line {lineno}: {len(fields)} fields but the header has {n_header}"
    except OSError as exc:
        return f"cannot read file: {exc.strerror or exc}"
    if quoted_from:
        return (f"line {quoted_from}: unclosed quote: the '\"' there opens a field that never "
                "ends")
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
    change = np.empty(n, dtype=bool)
    change[0] = True
    np.not_equal(users[1:], users[:-1], out=change[1:])
    sizes = np.diff(np.append(np.flatnonzero(change), n))  # rows of each user (contiguous)
    code = np.empty(n, dtype=np.int8)
    code[_shuffle_within_users(sizes, seed)] = _shuffled_codes(sizes)
    return code


def _shuffle_within_users(sizes: np.ndarray, seed: int) -> np.ndarray:
    """Row order that sorts each user's rows by their keys; every row stays in its user's range."""
    keys = np.random.default_rng(seed).random(int(sizes.sum()))
    shift = 63 - max(1, (len(sizes) - 1).bit_length())
    if shift < 32:  # pragma: no cover - more than 2^31 users
        return np.lexsort((keys, np.repeat(np.arange(len(sizes)), sizes)))
    # one int64 sort: the user's index in the high bits, the key's top `shift` bits below (ties,
    # which are vanishingly rare, fall back to row order: still deterministic)
    keys *= float(1 << shift)
    packed = np.floor(keys, out=keys).astype(np.int64)
    del keys
    packed |= np.repeat(np.arange(len(sizes), dtype=np.int64) << shift, sizes)
    return np.argsort(packed, kind="stable")


def _shuffled_codes(sizes: np.ndarray) -> np.ndarray:
    """Split codes by shuffled position, user after user: test, then train, val, test runs.

    For n rows, positions i = 0..n-1: i = 0 is test; of i >= 1, those with 10i < 8(n-1) are
    train, then those with 10i < 9(n-1) val, the rest test.
    """
    n = sizes.astype(np.int64)
    below_8 = (8 * (n - 1) + 9) // 10  # positions i >= 0 with 10i < 8(n-1): ceil(0.8(n-1))
    below_9 = (9 * (n - 1) + 9) // 10
    train = np.maximum(below_8 - 1, 0)  # i = 0 is among them when n >= 2, and it is test
    val = below_9 - below_8
    runs = np.stack([np.ones_like(n), train, val, n - 1 - train - val], axis=1).ravel()
    return np.repeat(np.tile(np.array([2, 0, 1, 2], dtype=np.int8), len(n)), runs)


def _id_codes(values: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """(ids, codes): ids sorted, ``ids[codes] == values``, codes a writable int64 array: offsets
    from the smallest id when the ids are compact (some ids may be absent then), else dense ranks."""
    lo, hi = int(values.min()), int(values.max())
    if hi - lo + 1 <= max(4 * len(values), 1 << 24):
        codes = values.to_numpy(writable=True)
        codes -= lo
        return np.arange(lo, hi + 1, dtype=np.int64), codes
    ranks = (values.rank("dense") - 1).cast(pl.Int64)
    return values.unique().sort().to_numpy(), ranks.to_numpy(writable=True)


def _first_of_runs(sorted_keys: np.ndarray) -> np.ndarray:
    keep = np.empty(len(sorted_keys), dtype=bool)
    keep[:1] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=keep[1:])
    return keep


def _unique_pairs(u: np.ndarray, i: np.ndarray, split: np.ndarray | None, n_users: int,
                  n_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(u, i, split) of the unique (u, i) pairs, sorted by (u, i); with ``split``, each pair keeps
    its earliest split (train < val < test). ``u`` is overwritten.

    One sort of int64 keys packing u | i | split into bit fields (u < n_users, i < n_items).
    """
    i_bits = max(1, (n_items - 1).bit_length())
    s_bits = 2 if split is not None else 0
    if max(1, (n_users - 1).bit_length()) + i_bits + s_bits > 63:  # pragma: no cover - huge spans
        order = np.lexsort((split if split is not None else i, i, u))
        u, i = u[order], i[order]
        keep = _first_of_runs(u) | _first_of_runs(i)
        return u[keep], i[keep], split[order][keep] if split is not None else None
    key = u  # packed in place
    key <<= i_bits + s_bits
    key |= i << s_bits if s_bits else i
    if split is not None:
        key |= split
    key.sort()
    key = key[_first_of_runs(key >> s_bits if s_bits else key)]
    if split is not None:
        split = (key & 3).astype(np.int8)
        key >>= s_bits
    u = key >> i_bits
    key &= (1 << i_bits) - 1
    return u, key, split


def _ranks(present: np.ndarray) -> np.ndarray:
    """Index of each True entry among the True entries (the new contiguous id), as int32."""
    return (np.cumsum(present) - 1).astype(np.int32)


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
    user_ids, u = _id_codes(df.get_column("user"))
    item_ids, i = _id_codes(df.get_column("item"))
    split = df.get_column("split").to_numpy() if has_split else None
    del df
    # de-duplicate; with a split column the earliest split of each (user, item) is kept
    u, i, split = _unique_pairs(u, i, split, len(user_ids), len(item_ids))
    duplicates = input_rows - below - len(u)

    per_user = np.bincount(u, minlength=len(user_ids))
    users_before = int(np.count_nonzero(per_user))
    # a given split is used as is: every user with a row stays; infrec's own split needs a few
    keep_user = per_user >= (1 if has_split else min_user_interactions)
    users = int(keep_user.sum())
    if users < 2:
        need = "a row" if has_split else f">= {min_user_interactions} interactions"
        raise InputError(f"{src}: only {users} user(s) with {need} after filtering; need at least 2")
    rows_before = len(u)
    if users < users_before:
        kept = keep_user[u]
        u, i = u[kept], i[kept]
        split = split[kept] if has_split else None
    # contiguous re-indexing over the kept rows (monotone: rows stay sorted by user, item)
    item_present = np.bincount(i, minlength=len(item_ids)) > 0
    u, i = _ranks(keep_user)[u], _ranks(item_present)[i]
    user_ids, item_ids = user_ids[keep_user], item_ids[item_present]

    if has_split:
        codes, split_source = split, "file"
    else:
        codes, split_source = random_split(u, seed), "random"
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


def _write_outputs(out_dir: Path, tables: dict[str, pl.DataFrame], manifest: dict, overwrite: bool) -> dict:
    """Write the tables and the manifest in a temporary sibling, then rename it (``atomic_dir``)."""
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        outputs = {}
        for name, table in tables.items():
            target = tmp / name
            table.write_parquet(target, compression="zstd", compression_level=3, statistics=True)
            outputs[name] = sha256_file(target)
        manifest["outputs"] = outputs
        (tmp / "manifest.json").write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n")
    return outputs


# --------------------------------------------------------------------------------------------
# the ingest stage (Prefect task and `infrec ingest --params`)


def run(params, log=None) -> dict:
    """The ingest stage: ingest ``ingest.input`` — or, when it is null, the embedded default
    (the generate stage's ``run``) — into ``<state_dir>/data/processed``, and keep the exact bytes
    read as ``<state_dir>/data/input/<name>`` (a DVC-cached output: every data version holds the
    input it was made from, so a rollback restores it while the user's own log keeps growing).

    The file is copied first and the copy is what gets parsed (the user's file may grow while it
    is read); bad input changes nothing — neither the processed data nor the snapshot.
    """
    from tasks import generate
    from tasks.data import load_dataset

    log = log or say()
    ing, paths = params.ingest, params.paths()
    if ing.input is None:
        generate.run(params, log=log)
    source = params.input_path()
    _check_input_file(source, str(source))
    point_log(params)
    columns = {role: name for role, name in (("user", ing.user_col), ("item", ing.item_col),
                                              ("rating", ing.rating_col)) if name}
    with atomic_dir(paths.snapshot, overwrite=True) as staged:
        copy = staged / source.name
        try:
            shutil.copyfile(source, copy)
        except OSError as exc:
            raise InputError(f"{source}: cannot read file: {exc.strerror or exc}") from None
        manifest = ingest(copy, paths.processed, fmt=ing.format, seed=ing.seed,
                          min_rating=ing.min_rating, columns=columns or None, overwrite=True,
                          min_user_interactions=ing.min_user_interactions, label=str(source))
        size = copy.stat().st_size
        fault_point("ingest")  # processed written, snapshot not yet swapped in
    data_version = load_dataset(paths.processed).data_version
    log(f"ingested {source} → {paths.processed}: {manifest['counts']} (data {data_version})")
    return {"data_dir": str(paths.processed), "data_version": data_version,
            "counts": manifest["counts"],
            "input": {"source": str(source), "name": source.name,
                      "sha256": manifest["input"]["sha256"], "size": size}}


def point_log(params) -> Path:
    """Keep ``<state_dir>/log`` a symbolic link to the file the ingest stage reads
    (``ingest.input``, or the generated embedded default): dvc.yaml lists it among the stage's
    deps, so DVC records the content hash of the user's own log — wherever it lives — and
    ``dvc status`` reports the ingest stage changed when the log grows."""
    return link_log(params.paths().log, params.input_path())


def link_log(link: Path, target: Path) -> Path:
    """``link`` → ``target`` (absolute), replaced atomically when it points elsewhere."""
    target = str(target)
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and os.readlink(link) == target:
        return link
    tmp = link.with_name(f".log.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)  # atomic: DVC never sees a missing link
    return link


def _ingest_task(params) -> dict:
    return run(params)


def __getattr__(name: str):
    """``ingest_task``, the stage's Prefect task, is made on first use: checking a file
    (:func:`validate`, the first thing ``infrec run`` does) then never imports Prefect (≈ 1.5 s
    of a refusal that must take under 3 s)."""
    if name != "ingest_task":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from prefect import task

    made = task(name="ingest", **task_options())(_ingest_task)
    globals()["ingest_task"] = made
    return made
