"""The no-op pyfunc that `bench/serve_load.py` serves as the server's floor (logged "from code").

It has the served model's signature (so MLflow parses and checks a request exactly as for the
champion) and answers every row with the same constant list of ``k`` items and scores (``k`` of
the request's first row, default 10) as plain lists — the cheapest answer the server can write.
It reads nothing of the request beyond its length: what it costs is the server's own cost.
"""

from __future__ import annotations

from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class NoOpPyfunc(PythonModel):
    def predict(self, context, model_input, params=None):
        n = len(model_input)
        k = 10
        if "k" in model_input and n:
            first = model_input["k"].iloc[0]
            k = int(first) if first == first else 10  # NaN: default
        row = {"items": list(range(k)), "scores": [0.0] * k, "unknown": []}
        return [row] * n


set_model(NoOpPyfunc())
