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
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

ARTIFACT_KEY = "model_dir"
DEFAULT_K = 10
DEFAULT_LIMITS = {"max_k": 1000, "max_history": 10_000, "max_batch": 10_000}
_INT64 = (-(2**63), 2**63 - 1)


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


def parse_rows(model_input: Any, limits: dict[str, int]) -> tuple[list[list[int]], list[int]]:
    """Validated ``(histories, ks)`` from a DataFrame, a dict of columns or a list of histories.
    Raises :class:`RequestError` naming the row and field at fault."""
    if hasattr(model_input, "columns"):  # pandas DataFrame
        if "history" not in model_input.columns:
            raise RequestError("input must have a 'history' field (a list of raw item ids)")
        histories = list(model_input["history"])
        ks = list(model_input["k"]) if "k" in model_input.columns else [None] * len(histories)
    elif isinstance(model_input, dict):
        if "history" not in model_input:
            raise RequestError("input must have a 'history' field (a list of raw item ids)")
        histories = list(model_input["history"])
        raw_k = model_input.get("k")
        ks = (list(raw_k) if isinstance(raw_k, (list, tuple, np.ndarray))
              else [raw_k] * len(histories))
    elif isinstance(model_input, (list, tuple)):
        histories, ks = list(model_input), [None] * len(model_input)
    else:
        raise RequestError(f"unsupported input type {type(model_input).__name__}")
    if not histories:
        raise RequestError("no rows in the request")
    if len(histories) > limits["max_batch"]:
        raise RequestError(f"{len(histories)} rows: at most {limits['max_batch']} per request")
    if len(ks) != len(histories):
        raise RequestError(f"'k' has {len(ks)} values for {len(histories)} histories")
    out_h, out_k = [], []
    for r, (history, k) in enumerate(zip(histories, ks)):
        if history is None or isinstance(history, (str, bytes, int, float)):
            raise RequestError(f"row {r}: 'history' must be a list of item ids")
        history = list(history)
        if not history:
            raise RequestError(f"row {r}: empty history (give at least one item id)")
        if len(history) > limits["max_history"]:
            raise RequestError(f"row {r}: history of {len(history)} ids; at most "
                               f"{limits['max_history']}")
        out_h.append([_as_int(x, f"row {r}: history") for x in history])
        missing = k is None or (isinstance(k, float) and np.isnan(k))
        k_val = DEFAULT_K if missing else _as_int(k, f"row {r}: k")
        if not 1 <= k_val <= limits["max_k"]:
            raise RequestError(f"row {r}: k must be between 1 and {limits['max_k']}, got {k_val}")
        out_k.append(k_val)
    return out_h, out_k


class InfAEPyfunc(PythonModel):
    """Recommend top-k raw item ids for raw-id histories with a fitted ∞-AE."""

    def load_context(self, context) -> None:
        config = getattr(context, "model_config", None) or {}
        self.load_dir(context.artifacts[ARTIFACT_KEY], config)

    def load_dir(self, model_dir: str, limits: dict[str, int] | None = None) -> "InfAEPyfunc":
        from tasks.model_store import load_model

        self.model, self.item_ids, self.info = load_model(model_dir)
        self.index = {int(raw): col for col, raw in enumerate(self.item_ids.tolist())}
        self.limits = {**DEFAULT_LIMITS, **{k: int(v) for k, v in (limits or {}).items()
                                           if k in DEFAULT_LIMITS}}
        return self

    def encode(self, histories: list[list[int]]) -> tuple[Any, list[list[str]]]:
        """Raw-id histories → a CSR matrix in the model's item space, plus the unknown ids."""
        import scipy.sparse as sp

        rows, cols, unknown = [], [], []
        for r, history in enumerate(histories):
            missing: list[str] = []
            seen_cols: set[int] = set()
            for raw in history:
                col = self.index.get(raw)
                if col is None:
                    missing.append(str(raw))
                elif col not in seen_cols:
                    seen_cols.add(col)
                    rows.append(r)
                    cols.append(col)
            unknown.append(missing)
        mat = sp.csr_matrix(
            (np.ones(len(rows), dtype=np.float32), (rows, cols)),
            shape=(len(histories), len(self.item_ids)),
        )
        return mat, unknown

    def recommend(self, histories: list[list[int]], ks: list[int]) -> list[dict[str, Any]]:
        """Top-k per history; a :class:`RequestError` when a history has no id the model knows."""
        mat, unknown = self.encode(histories)
        for r in range(len(histories)):
            if mat.indptr[r + 1] == mat.indptr[r]:
                raise RequestError(f"row {r}: none of its {len(histories[r])} item id(s) is "
                                   f"known to this model (its catalogue has {len(self.item_ids)} "
                                   "items: another catalogue's ids?)")
        k_max = max(1, min(max(ks), len(self.item_ids)))
        top, scores = self.model.recommend(mat, k_max)
        out = []
        for r, k in enumerate(ks):
            # with fewer than k unseen items, the tail of the top-k list is seen items: drop them
            seen = mat.indices[mat.indptr[r] : mat.indptr[r + 1]]
            keep = ~np.isin(top[r][:k], seen)
            idx = top[r][:k][keep]
            out.append({"items": [int(i) for i in self.item_ids[idx]],
                        "scores": [float(s) for s in scores[r][:k][keep]],
                        "unknown": unknown[r]})
        return out

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        try:
            histories, ks = parse_rows(model_input, self.limits)
            rows = self.recommend(histories, ks)
        except RequestError as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        return pd.DataFrame(rows, columns=["items", "scores", "unknown"])


set_model(InfAEPyfunc())
