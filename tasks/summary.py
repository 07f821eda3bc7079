"""Data summaries on disk: a self-describing, sparse Parquet file of synthetic users.

Rows are ``(synthetic_user Int32, item Int32, weight Float32)`` for every entry above
:data:`MIN_WEIGHT` (a Distill-CF summary is mostly ≈ 0 after hard-tanh; sampler baselines are
binary). The file's key-value metadata (key ``infrec.summary``) is one JSON object:

* ``format`` (:data:`FORMAT_VERSION`), ``shape`` ``[μ, m]``, ``sampler``, ``budget``, ``seed``;
* ``config`` (the distillation hyper-parameters), ``source`` (data directory, data version hash);
* ``item_ids``: the raw item id of every item column, so that a reader can check the summary
  belongs to the data it fits on;
* anything else the writer passes in ``meta``.

Written atomically (temporary file in the same directory + ``os.replace``).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tasks.errors import InputError

FORMAT_VERSION = 1
METADATA_KEY = b"infrec.summary"
MIN_WEIGHT = 1e-6
COLUMNS = ("synthetic_user", "item", "weight")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def write_summary(path: str | Path, support: np.ndarray, item_ids: np.ndarray,
                  meta: dict[str, Any]) -> Path:
    """Write ``support`` (μ × m, values in [0, 1]) sparsely to ``path`` with its metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    support = np.asarray(support, dtype=np.float32)
    item_ids = np.asarray(item_ids, dtype=np.int64)
    if support.ndim != 2:
        raise ValueError(f"support must be a matrix, got shape {support.shape}")
    if support.shape[1] != len(item_ids):
        raise ValueError(f"support has {support.shape[1]} items, the item map {len(item_ids)}")
    if not np.all(np.isfinite(support)):
        raise ValueError("support has non-finite entries")
    users, items = np.nonzero(support > MIN_WEIGHT)
    table = pa.table({
        "synthetic_user": pa.array(users.astype(np.int32), pa.int32()),
        "item": pa.array(items.astype(np.int32), pa.int32()),
        "weight": pa.array(support[users, items], pa.float32()),
    })
    info = {key: _jsonable(value) for key, value in meta.items()}
    info.update({"format": FORMAT_VERSION, "shape": [int(support.shape[0]), int(support.shape[1])],
                 "nnz": int(len(users)), "item_ids": item_ids.tolist()})
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(info).encode()})

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def read_summary(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(support μ × m float32, item_ids int64, meta)`` from a file :func:`write_summary` wrote.

    ``meta`` is the stored metadata without ``item_ids`` (returned on its own).

    A missing, unreadable or malformed file raises :class:`InputError` with a one-line message
    that names it.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such summary file")
    try:
        pf = pq.ParquetFile(path)
        raw = (pf.schema_arrow.metadata or {}).get(METADATA_KEY)
        table = pf.read()
    except Exception as exc:  # noqa: BLE001 - any read failure is a bad input file
        raise InputError(f"{path}: not a readable Parquet summary ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'})") from exc
    if raw is None:
        raise InputError(f"{path}: not a data summary (no '{METADATA_KEY.decode()}' metadata; "
                         "write it with `infrec distill`)")
    try:
        meta = json.loads(raw)
        n_users, n_items = (int(v) for v in meta["shape"])
        item_ids = np.asarray(meta["item_ids"], dtype=np.int64)
        version = int(meta["format"])
    except Exception as exc:  # noqa: BLE001 - malformed metadata
        raise InputError(f"{path}: malformed summary metadata ({type(exc).__name__}: {exc})"
                         ) from exc
    if version > FORMAT_VERSION:
        raise InputError(f"{path}: summary format {version} is newer than this reader "
                         f"({FORMAT_VERSION})")
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
    if len(item_ids) != n_items:
        raise InputError(f"{path}: item map has {len(item_ids)} ids but shape says {n_items} items")
    users = table.column("synthetic_user").to_numpy(zero_copy_only=False)
    items = table.column("item").to_numpy(zero_copy_only=False)
    weights = table.column("weight").to_numpy(zero_copy_only=False).astype(np.float32)
    outside = len(users) and (users.min() < 0 or users.max() >= n_users
                              or items.min() < 0 or items.max() >= n_items)
    if outside:
        raise InputError(f"{path}: entries outside the declared shape {n_users} × {n_items}")
    if not np.all(np.isfinite(weights)):
        raise InputError(f"{path}: non-finite weights")
    support = np.zeros((n_users, n_items), dtype=np.float32)
    support[users, items] = weights
    meta.pop("item_ids", None)  # returned on its own
    return support, item_ids, meta


__all__ = ["write_summary", "read_summary", "FORMAT_VERSION", "MIN_WEIGHT"]
