"""∞-AE as an ``mlflow.pyfunc`` model, logged "from code" (this file is the model's code).

Nothing is pickled: the model's artifact is the model directory written by the fit stage
(:mod:`tasks.model_store`), read back by :meth:`InfAEPyfunc.load_context`; the kernel is the
closed-form NTK (no neural-tangents, no TensorFlow, no Prefect). The project's ``models/`` and
``tasks/`` folders travel with the logged model (``code_paths``), so it loads in any Python that
has the pinned requirements, with or without this checkout.

Request: one row per user with ``history`` — the user's known raw item ids — and optional ``k``
(default 10). Both MLflow input forms work::

    {"dataframe_records": [{"history": [10, 20, 30], "k": 5}]}
    {"inputs": {"history": [[10, 20, 30]], "k": [5]}}

Response per row: ``items`` (top-k raw item ids, best first, seen items excluded), ``scores`` and
``unknown`` (history ids the model does not know; ignored — but a history made only of unknown
ids, another catalogue's, is refused: no recommendation is better than another catalogue's
items). Requests are validated and bounded
(``serving.*`` of params.yaml, stored with the model): ``1 ≤ k ≤ max_k``, a non-empty history of
integer ids (64-bit) of at most ``max_history`` ids, at most ``max_batch`` rows; anything else is
refused with a 400 and a short message that never echoes the input back.

What a request costs (``bench/serve_load.py`` measures it beside a no-op model): everything that
does not depend on the request is done once, when the model loads — the catalogue's id lookup
(sorted ids, :class:`Catalogue`), the scorer with its arrays in float32 and its compiled kernel
warmed for every row count it pads to (:meth:`models.infinite_ae.RowScorer.warm`). A request is
parsed into int64 arrays (a Python loop per row, never per item, unless the ids are not plain
integers), looked up with one ``searchsorted``, scored (a few histories: in NumPy in the handling
thread, no XLA dispatch; a batch: 256 histories at a time through the jitted kernel), ranked as
:func:`models.metrics.top_k_unseen` ranks, and answered as plain lists:
under ``mlflow models serve`` :meth:`InfAEPyfunc.predict` returns the rows as a list of dicts (the
same JSON, without a DataFrame for the server to take apart again); in-process callers still get
a DataFrame.

Threads, set by the model in the server's process (``mlflow models serve`` runs each ``predict``
on a thread of its pool, several at once): BLAS uses one thread per call and XLA's CPU backend
one thread (:func:`fit_threads_to_server`), so concurrent requests do not oversubscribe the
cores; a batch of more than :data:`CHUNK_ROWS` histories is scored in chunks on at most
``cores / server workers`` threads (``mlflow models serve --workers``, default 1). Outside the
server (``infrec recommend``, ``mlflow.pyfunc.load_model`` in your Python) nothing is changed.

Other model families slot in behind one interface, :func:`scorer_for`: an object with
``n_items``, ``max_rows`` and ``scores(csr_rows) -> float32 array`` (``warm()`` optional).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from models.metrics import top_k_unseen

ARTIFACT_KEY = "model_dir"
DEFAULT_K = 10
DEFAULT_LIMITS = {"max_k": 1000, "max_history": 10_000, "max_batch": 10_000}
_INT64 = (-(2**63), 2**63 - 1)
CHUNK_ROWS = 256  # a batch request is scored this many histories at a time
OUTPUT_COLUMNS = ["items", "scores", "unknown"]
# set by `mlflow models serve` (mlflow.pyfunc.scoring_server) for the process that loads the model
SERVER_MODEL_PATH_ENV = "__pyfunc_model_path__"


class RequestError(ValueError):
    """A request the model refuses (a 400 when served; exit 2 in ``infrec recommend``)."""


def signature():
    """In: ``history`` (list of raw item ids) + optional ``k``. Out: items, scores, unknown."""
    from mlflow.models import ModelSignature
    from mlflow.types import DataType
    from mlflow.types.schema import Array, ColSpec, Schema

    inputs = Schema([
        ColSpec(Array(DataType.long), "history"),
        ColSpec(DataType.long, "k", required=False),
    ])
    outputs = Schema([
        ColSpec(Array(DataType.long), "items"),
        ColSpec(Array(DataType.double), "scores"),
        ColSpec(Array(DataType.string), "unknown"),
    ])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise RequestError(f"{what}: expected an integer, got a boolean")
    if isinstance(value, (int, np.integer)):
        out = int(value)
    elif isinstance(value, (float, np.floating)) and float(value).is_integer():
        out = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        out = int(value.strip())
    else:
        raise RequestError(f"{what}: expected an integer, got {type(value).__name__}")
    if not _INT64[0] <= out <= _INT64[1]:
        raise RequestError(f"{what}: out of the 64-bit integer range")
    return out


def _plain_int_type(t: type) -> bool:
    return t is not bool and (issubclass(t, int) or issubclass(t, np.integer))


def _history(history: Any, r: int, max_history: int) -> np.ndarray:
    """One row's ids as int64 (validated). Plain integers — a list of ints, an integer array, what
    MLflow's schema enforcement hands over — take a vectorised path; anything else (digit strings,
    integral floats, a boolean, an id past 64 bits) goes id by id through :func:`_as_int`."""
    if history is None or isinstance(history, (str, bytes, int, float)):
        raise RequestError(f"row {r}: 'history' must be a list of item ids")
    if not isinstance(history, (list, np.ndarray)):
        history = list(history)
    n = len(history)
    if not n:
        raise RequestError(f"row {r}: empty history (give at least one item id)")
    if n > max_history:
        raise RequestError(f"row {r}: history of {n} ids; at most {max_history}")
    if isinstance(history, np.ndarray):
        if history.ndim == 1 and history.dtype.kind == "i":
            return history.astype(np.int64, copy=False)
        if history.ndim == 1 and history.dtype.kind == "u" and history.max() <= _INT64[1]:
            return history.astype(np.int64)
    elif all(_plain_int_type(t) for t in set(map(type, history))):
        try:
            return np.array(history, dtype=np.int64)
        except OverflowError:
            pass  # an id past 64 bits: the slow path names it
    return np.array([_as_int(x, f"row {r}: history") for x in history], dtype=np.int64)


def _first_bad_k(ks: Any, n: int, max_k: int) -> tuple[list[int], int | None, Exception | None]:
    """``(ks as ints, first row whose k is refused or None, its error)``; vectorised for numeric
    columns, row by row otherwise."""
    if ks is None:
        return [DEFAULT_K] * n, None, None
    if isinstance(ks, np.ndarray):
        arr = ks
    elif all(_plain_int_type(t) for t in set(map(type, ks))):
        arr = np.asarray(ks)
    else:
        arr = np.asarray(ks, dtype=object)  # booleans, strings, None: row by row
    if arr.ndim == 1 and arr.dtype.kind == "f":
        missing = np.isnan(arr)
        if not (arr[~missing] == np.floor(arr[~missing])).all():
            arr = arr.astype(object)  # a fractional k: the row-by-row path names it
        else:
            arr = np.where(missing, DEFAULT_K, arr)
            if np.abs(arr).max() < 2**62:
                arr = arr.astype(np.int64)
    if arr.ndim == 1 and arr.dtype.kind in "iu":
        bad = np.flatnonzero((arr < 1) | (arr > max_k))
        out = arr.tolist()
        if bad.size:
            r = int(bad[0])
            return out, r, RequestError(f"row {r}: k must be between 1 and {max_k}, got {out[r]}")
        return out, None, None
    out = []
    for r, k in enumerate(ks):
        missing = k is None or (isinstance(k, float) and np.isnan(k))
        try:
            k_val = DEFAULT_K if missing else _as_int(k, f"row {r}: k")
            if not 1 <= k_val <= max_k:
                raise RequestError(f"row {r}: k must be between 1 and {max_k}, got {k_val}")
        except RequestError as exc:
            return out, r, exc
        out.append(k_val)
    return out, None, None


def _column(names: list, name: str) -> int | None:
    """Position of column ``name`` in ``names`` (None if absent; a repeated name is refused)."""
    if name not in names:
        return None
    if names.count(name) > 1:
        raise RequestError(f"the field {name!r} is given more than once")
    return names.index(name)


def parse_rows(model_input: Any, limits: dict[str, int]) -> tuple[list[np.ndarray], list[int]]:
    """Validated ``(histories as int64 arrays, ks)`` from a DataFrame, a dict of columns or a list
    of histories. Raises :class:`RequestError` naming the row and field at fault (the first row at
    fault; within a row its history before its k)."""
    if isinstance(model_input, pd.DataFrame):
        # positions in the list of names, then one to_numpy: a DataFrame's label lookup builds
        # a hash table of its (Arrow string) column index, which costs more than the rest here
        names = list(model_input.columns)
        at_h, at_k = _column(names, "history"), _column(names, "k")
        if at_h is None:
            raise RequestError("input must have a 'history' field (a list of raw item ids)")
        values = model_input.to_numpy().T
        histories = values[at_h].tolist()
        ks = None if at_k is None else values[at_k].tolist()
    elif isinstance(model_input, dict):
        if "history" not in model_input:
            raise RequestError("input must have a 'history' field (a list of raw item ids)")
        histories = list(model_input["history"])
        raw_k = model_input.get("k")
        ks = (list(raw_k) if isinstance(raw_k, (list, tuple, np.ndarray))
              else None if raw_k is None else [raw_k] * len(histories))
    elif isinstance(model_input, (list, tuple)):
        histories, ks = list(model_input), None
    else:
        raise RequestError(f"unsupported input type {type(model_input).__name__}")
    if not histories:
        raise RequestError("no rows in the request")
    if len(histories) > limits["max_batch"]:
        raise RequestError(f"{len(histories)} rows: at most {limits['max_batch']} per request")
    if ks is not None and len(ks) != len(histories):
        raise RequestError(f"'k' has {len(ks)} values for {len(histories)} histories")
    out_k, bad_row, bad_k = _first_bad_k(ks, len(histories), limits["max_k"])
    max_history = limits["max_history"]
    last = len(histories) if bad_row is None else bad_row + 1
    out_h = [_history(histories[r], r, max_history) for r in range(last)]
    if bad_k is not None:
        raise bad_k
    return out_h, out_k


class Catalogue:
    """The model's raw item ids and a vectorised raw id → column lookup (built once, at load)."""

    def __init__(self, item_ids: np.ndarray) -> None:
        self.item_ids = np.asarray(item_ids).astype(np.int64)
        self.order = np.argsort(self.item_ids, kind="stable")
        self.sorted_ids = self.item_ids[self.order]
        self.n_items = len(self.item_ids)

    def encode(self, histories: list[np.ndarray]
               ) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
        """Int64 raw-id histories → binary rows as CSR parts ``(indptr, indices)`` (each known
        item once, columns ascending), plus each row's unknown ids (strings, in request order)."""
        n, m = len(histories), self.n_items
        flat = histories[0] if n == 1 else np.concatenate(histories)
        pos = np.searchsorted(self.sorted_ids, flat)
        np.minimum(pos, m - 1, out=pos)
        known = self.sorted_ids[pos] == flat
        all_known = bool(known.all())
        if n == 1:
            indices = np.sort(self.order[pos if all_known else pos[known]])
            if len(indices) > 1 and not (indices[1:] != indices[:-1]).all():  # repeated ids
                indices = np.unique(indices)
            indptr = np.array([0, len(indices)])
            unknown = [[] if all_known else [str(x) for x in flat[~known].tolist()]]
            return indptr, indices, unknown
        lengths = np.fromiter(map(len, histories), dtype=np.int64, count=n)
        rows = np.repeat(np.arange(n, dtype=np.int64), lengths)
        keys = np.unique(rows[known] * m + self.order[pos[known]])
        indices = keys % m
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(keys // m, minlength=n), out=indptr[1:])
        unknown: list[list[str]] = [[] for _ in range(n)]
        if not all_known:
            starts = np.concatenate([[0], np.cumsum(lengths)]).tolist()
            for r in np.unique(rows[~known]).tolist():
                a, b = starts[r], starts[r + 1]
                unknown[r] = [str(x) for x in flat[a:b][~known[a:b]].tolist()]
        return indptr, indices, unknown


class _ScoresOf:
    """:func:`scorer_for`'s adapter for a model with only ``scores(csr_rows)``."""

    def __init__(self, model: Any, max_rows: int = 1024) -> None:
        self.model, self.n_items, self.max_rows = model, model.n_items, max_rows

    def scores(self, indptr: np.ndarray, indices: np.ndarray) -> np.ndarray:
        import scipy.sparse as sp

        rows = sp.csr_matrix((np.ones(len(indices), dtype=np.float32), indices, indptr),
                             shape=(len(indptr) - 1, self.n_items))
        return np.array(self.model.scores(rows), dtype=np.float32)


def scorer_for(model: Any, max_rows: int = CHUNK_ROWS) -> Any:
    """The served scoring function of a fitted model — the one interface a model family gives
    the server: ``n_items``, ``max_rows`` and ``scores(indptr, indices)`` → a new float32 array
    (rows × items) for binary history rows given as CSR parts (``warm()`` optional). A model's
    ``row_scorer(max_rows)`` when it has one (∞-AE: :class:`models.infinite_ae.RowScorer`), else
    its ``scores(csr_rows)``."""
    make = getattr(model, "row_scorer", None)
    return make(max_rows) if make is not None else _ScoresOf(model, max_rows)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """:func:`models.metrics.top_k_unseen` of already-masked scores (``overwrite``): a one-row
    path of a few NumPy calls (the same order: score descending, ties by lower index, also at the
    cut), else that function."""
    m = scores.shape[1]
    if scores.shape[0] != 1 or k >= m or np.isnan(scores).any():
        return top_k_unseen(scores, None, k, overwrite=True)
    s = scores[0]
    part = np.argpartition(s, m - k)[m - k:]
    best = s[part]
    kth = best.min()
    if np.count_nonzero(s >= kth) > k:  # items tied at the k-th score straddle the cut
        above = np.flatnonzero(s > kth)
        part = np.concatenate([above, np.flatnonzero(s == kth)[: k - len(above)]])
        best = s[part]
    return part[np.lexsort((part, -best))][None, :]


def _server_workers() -> int:
    """``--workers`` of the uvicorn running this process (``mlflow models serve --workers``): in
    this process's command line or its parent's (the supervisor of several workers); else 1."""
    for pid in ("self", str(os.getppid())):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "uvicorn" in " ".join(args[:3]) and "--workers" in args:
            value = args[args.index("--workers") + 1]
            if value.isdigit() and int(value) > 0:
                return int(value)
    return 1


def fit_threads_to_server() -> int:
    """In the server's process: one BLAS thread per call and a single-threaded XLA CPU backend
    (each request is already one of several threads); returns the threads a batch may use,
    ``cores / server workers`` (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1, user_api="blas")
    except ImportError:  # pragma: no cover - threadpoolctl is in the pinned set
        pass
    try:
        from jax._src import xla_bridge

        if not xla_bridge.backends_are_initialized():
            flags = os.environ.get("XLA_FLAGS", "")
            if "xla_cpu_multi_thread_eigen" not in flags:
                os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false "
                                           "intra_op_parallelism_threads=1").strip()
    except (ImportError, AttributeError):  # pragma: no cover - another JAX: its defaults
        pass
    return max(1, (cores or 1) // _server_workers())


class InfAEPyfunc(PythonModel):
    """Recommend top-k raw item ids for raw-id histories with a fitted ∞-AE."""

    served = False  # True in `mlflow models serve`'s process: predict answers plain lists
    batch_threads = 1

    def load_context(self, context) -> None:
        config = getattr(context, "model_config", None) or {}
        if os.environ.get(SERVER_MODEL_PATH_ENV):
            self.served = True
            self.batch_threads = fit_threads_to_server()
        self.load_dir(context.artifacts[ARTIFACT_KEY], config)
        if self.served:  # compile and touch everything a request uses, before the first one
            if hasattr(self.scorer, "warm"):
                self.scorer.warm()
            if self.batch_threads > 1:
                self._pool = ThreadPoolExecutor(self.batch_threads, "infrec-score")
            self.recommend([self.catalogue.item_ids[:1]], [1])

    def load_dir(self, model_dir: str, limits: dict[str, int] | None = None) -> "InfAEPyfunc":
        from tasks.model_store import load_model

        model, item_ids, info = load_model(model_dir)
        return self.use(model, item_ids, info, limits)

    def use(self, model: Any, item_ids: np.ndarray, info: dict[str, Any],
            limits: dict[str, int] | None = None) -> "InfAEPyfunc":
        """Serve ``model`` (its catalogue ``item_ids``): what does not depend on a request."""
        self.model, self.item_ids, self.info = model, item_ids, info
        self.catalogue = Catalogue(item_ids)
        self.scorer = scorer_for(model)
        self.limits = {**DEFAULT_LIMITS, **{k: int(v) for k, v in (limits or {}).items()
                                           if k in DEFAULT_LIMITS}}
        self._pool = None
        return self

    def encode(self, histories: list[Any]) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
        """Raw-id histories → binary rows in the model's item space (CSR parts), plus the
        unknown ids (:meth:`Catalogue.encode`)."""
        return self.catalogue.encode([np.asarray(h, dtype=np.int64) for h in histories])

    def _rank(self, indptr: np.ndarray, indices: np.ndarray, k_max: int
              ) -> tuple[list[list[int]], list[list[float]]]:
        """Top ``k_max`` of one chunk of rows: raw ids and scores (−inf where seen items filled
        a row's list: fewer than ``k_max`` unseen items)."""
        scores = self.scorer.scores(indptr, indices)
        sizes = np.diff(indptr)
        rows = 0 if len(sizes) == 1 else np.repeat(np.arange(len(sizes)), sizes)
        scores[rows, indices] = -np.inf  # seen items rank last
        top = top_k(scores, k_max)
        best = (scores[0, top[0]][None, :] if len(sizes) == 1
                else np.take_along_axis(scores, top, axis=1))
        return self.catalogue.item_ids[top].tolist(), best.tolist()

    def recommend(self, histories: list[Any], ks: list[int]) -> list[dict[str, Any]]:
        """Top-k per history; a :class:`RequestError` when a history has no id the model knows."""
        indptr, indices, unknown = self.encode(histories)
        sizes = np.diff(indptr)
        if not sizes.all():
            r = int(np.flatnonzero(sizes == 0)[0])
            raise RequestError(f"row {r}: none of its {len(histories[r])} item id(s) is "
                               f"known to this model (its catalogue has {len(self.item_ids)} "
                               "items: another catalogue's ids?)")
        n, m = len(sizes), self.catalogue.n_items
        k_max = max(1, min(max(ks), m))
        step = min(CHUNK_ROWS, getattr(self.scorer, "max_rows", CHUNK_ROWS))
        if n <= step:
            chunks = [self._rank(indptr, indices, k_max)]
        else:
            parts = [(indptr[a: a + step + 1] - indptr[a], indices[indptr[a]: indptr[min(a + step, n)]])
                     for a in range(0, n, step)]
            if self._pool is not None:
                chunks = list(self._pool.map(lambda part: self._rank(*part, k_max), parts))
            else:
                chunks = [self._rank(*part, k_max) for part in parts]
        items = chunks[0][0] if len(chunks) == 1 else [row for c in chunks for row in c[0]]
        scores = chunks[0][1] if len(chunks) == 1 else [row for c in chunks for row in c[1]]
        # rows with fewer than k unseen items: their lists end with seen ones (−inf): dropped
        short = set(np.flatnonzero(m - sizes < np.minimum(ks, k_max)).tolist())
        out = []
        for r, k in enumerate(ks):
            its, scs = items[r], scores[r]
            if k < k_max:
                its, scs = its[:k], scs[:k]
            if r in short:
                keep = [i for i, s in enumerate(scs) if s != float("-inf")]
                its, scs = [its[i] for i in keep], [scs[i] for i in keep]
            out.append({"items": its, "scores": scs, "unknown": unknown[r]})
        return out

    def predict(self, context, model_input: pd.DataFrame, params=None) -> Any:
        try:
            histories, ks = parse_rows(model_input, self.limits)
            rows = self.recommend(histories, ks)
        except RequestError as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        if self.served:  # the JSON the server writes from a DataFrame, without building one
            return rows
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)


set_model(InfAEPyfunc())
