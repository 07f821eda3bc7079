"""Scoring and evaluating user batches on a Dask cluster — or in this process.

:func:`evaluate_scorer` is the one call every stage uses for a model's final figures (the fit
stage's test metrics of the candidate, the ∞-AE reference's, EASE's and PopRec's, the random
users'): with ``evaluate.dask_address`` unset it is
:func:`models.infinite_ae.evaluate_score_batches` over the scorer's batches, in this process; set
to a scheduler's address (``tcp://host:8786``), each batch of users is scored and ranked on a
worker (the model is sent to every worker once) and only its metric sums come back, merged in
batch order — the same figures either way. λ grids (validation of every λ) stay in this process.

A scorer is any fitted model with ``iter_scores(histories, batch_size)`` (∞-AE, EASE, PopRec).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from models.infinite_ae import (EvalSet, batch_accumulator, batch_rows, evaluate_score_batches,
                                evaluation_plan, finish_evaluation, row_slice)
from models.metrics import RankingAccumulator
from tasks.errors import InputError

# seconds to reach a scheduler before the stage fails with one line
CONNECT_TIMEOUT_S = 20


def evaluate_scorer(scorer: Any, data: EvalSet, *, batch_size: int,
                    address: Optional[str] = None, stats: Optional[dict[str, Any]] = None,
                    log: Optional[Callable[[str], None]] = None) -> dict[str, float]:
    """Every metric of ``scorer`` on ``data`` (see the module docstring); ``stats`` receives the
    number of users and the 95% intervals."""
    if not address:
        return evaluate_score_batches(scorer.iter_scores(data.context, batch_size), data,
                                      stats=stats)
    rows = batch_rows(batch_size, data.context.shape[1])
    plan = evaluation_plan(None)
    client = connect(address)
    try:
        model = client.scatter(scorer, broadcast=True)
        futures = [client.submit(_score_batch, model, row_slice(data, start, start + rows), plan,
                                 batch_size, pure=False)
                   for start in range(0, data.context.shape[0], rows)]
        if log is not None:
            log(f"scoring {data.context.shape[0]} users in {len(futures)} batches on the Dask "
                f"cluster at {address}")
        acc = RankingAccumulator(weights=data.weights, ks=plan.ks)
        for future in futures:  # batch order: the same sums as in this process
            acc.merge(future.result())
    finally:
        client.close()
    return finish_evaluation(acc, None, stats)


def _score_batch(scorer: Any, data: EvalSet, plan: Any, batch_size: int) -> RankingAccumulator:
    """On a worker: one batch's scores (one call of the scorer's own batching) and metric sums."""
    (_, scores), = list(scorer.iter_scores(data.context, batch_size))
    return batch_accumulator(np.asarray(scores), data, plan)


def connect(address: str) -> Any:
    """A ``distributed.Client`` of the scheduler at ``address``; one-line error if unreachable."""
    from distributed import Client

    try:
        return Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise InputError(f"evaluate.dask_address {address}: no Dask scheduler answers "
                         f"({type(exc).__name__}: {exc})") from None


__all__ = ["evaluate_scorer", "connect"]
