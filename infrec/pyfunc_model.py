"""∞-AE as an ``mlflow.pyfunc`` model, logged "from code" (this file is the model's code).

Nothing is pickled: the model's artifacts are the plain model directory written by
:func:`tasks.fit.save_model` (``model.npz`` with support and α, ``model.json`` with λ and the
kernel config, ``item_map.parquet``); :meth:`InfAEPyfunc.load_context` reads it back with
:func:`tasks.fit.load_model`, which rebuilds the closed-form NTK (no neural-tangents, no
TensorFlow, no jitted closure in the artifact).

Input (one row per user): ``history`` — the user's known raw item ids — and optional ``k``
(default 10). Output per row: ``items`` (top-k raw item ids, best first, seen items excluded),
``scores`` and ``unknown`` (the history ids the model does not know; they are ignored).
Accepted input shapes: a DataFrame with those columns, a dict ``{"history": [[...]], "k": [...]}``,
or a list of histories.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

ARTIFACT_KEY = "model_dir"
DEFAULT_K = 10


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


def _rows(model_input: Any) -> tuple[list[Any], list[int]]:
    """Histories and k per row from a DataFrame, a dict of columns or a list of histories."""
    if hasattr(model_input, "columns"):  # pandas DataFrame
        if "history" not in model_input.columns:
            raise mlflow.exceptions.MlflowException.invalid_parameter_value(
                "input must have a 'history' column (a list of raw item ids per user)"
            )
        histories = list(model_input["history"])
        ks = list(model_input["k"]) if "k" in model_input.columns else [None] * len(histories)
    elif isinstance(model_input, dict):
        histories = list(model_input.get("history", []))
        ks = model_input.get("k")
        ks = list(ks) if isinstance(ks, (list, tuple, np.ndarray)) else [ks] * len(histories)
    else:
        histories, ks = list(model_input), [None] * len(model_input)
    out_k = []
    for k in ks:
        try:
            missing = k is None or (isinstance(k, float) and np.isnan(k))
            out_k.append(DEFAULT_K if missing else int(k))
        except (TypeError, ValueError):
            out_k.append(DEFAULT_K)
    return histories, out_k


class InfAEPyfunc(PythonModel):
    """Recommend top-k raw item ids for raw-id histories with a fitted ∞-AE."""

    def load_context(self, context) -> None:
        self.load_dir(context.artifacts[ARTIFACT_KEY])

    def load_dir(self, model_dir: str) -> "InfAEPyfunc":
        from tasks.fit import load_model

        self.model, self.item_ids, self.info = load_model(model_dir)
        self.index = {int(raw): col for col, raw in enumerate(self.item_ids.tolist())}
        return self

    def encode(self, histories: list[Any]) -> tuple[Any, list[list[str]]]:
        """Raw-id histories → a CSR matrix in the model's item space, plus the unknown ids."""
        import scipy.sparse as sp

        rows, cols, unknown = [], [], []
        for r, history in enumerate(histories):
            missing: list[str] = []
            seen_cols: set[int] = set()
            for raw in [] if history is None else list(history):
                try:
                    col = self.index.get(int(raw))
                except (TypeError, ValueError):
                    col = None
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

    def recommend(self, histories: list[Any], ks: list[int]) -> list[dict[str, Any]]:
        if not histories:
            return []
        mat, unknown = self.encode(histories)
        k_max = max(1, min(max(ks), len(self.item_ids)))
        top, scores = self.model.recommend(mat, k_max)
        out = []
        for r, k in enumerate(ks):
            # with fewer than k unseen items, the tail of the top-k list is seen items: drop them
            seen = mat.indices[mat.indptr[r] : mat.indptr[r + 1]]
            keep = ~np.isin(top[r][: max(k, 0)], seen)
            idx = top[r][: max(k, 0)][keep]
            out.append({
                "items": [int(i) for i in self.item_ids[idx]],
                "scores": [float(s) for s in scores[r][: max(k, 0)][keep]],
                "unknown": unknown[r],
            })
        return out

    # The DataFrame hint: the declared signature (not type hints) validates the input.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        histories, ks = _rows(model_input)
        return pd.DataFrame(self.recommend(histories, ks), columns=["items", "scores", "unknown"])


set_model(InfAEPyfunc())
