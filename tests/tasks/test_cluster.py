"""Scoring user batches on a Dask cluster gives the in-process figures (a real LocalCluster with
two worker processes on loopback, closed afterwards)."""

from __future__ import annotations

import numpy as np
import pytest

from models.baselines import PopRec, fit_ease_select
from models.infinite_ae import EvalSet, fit_select
from tasks.cluster import evaluate_scorer
from tasks.errors import InputError
from tests.models.test_infinite_ae import low_rank_data

pytestmark = pytest.mark.slow  # `make test-fast` leaves it out: a Dask LocalCluster per test


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as c:
        yield c.scheduler_address


def test_the_dask_path_equals_the_in_process_path(cluster):
    train, val, w = low_rank_data(21, n=300)
    negatives = np.tile(np.arange(50), (train.shape[0], 1))
    ev = EvalSet(context=train, targets=val, weights=w, negatives=negatives)
    infae, _ = fit_select(train, ev, [1.0, 5.0], support_is_val_context=True,
                          select_metric="ndcg@10")
    ease, _ = fit_ease_select(train, ev, [10.0], select_metric="ndcg@10")
    for scorer in (infae, ease, PopRec.fit(train)):
        local_stats: dict = {}
        remote_stats: dict = {}
        local = evaluate_scorer(scorer, ev, batch_size=64, stats=local_stats)
        remote = evaluate_scorer(scorer, ev, batch_size=64, address=cluster, stats=remote_stats)
        assert remote == local and "auc" in local  # every metric, bit for bit
        assert remote_stats == local_stats and local_stats["users"] == ev.n_users


def test_an_unreachable_scheduler_is_one_clear_error():
    train, val, w = low_rank_data(22, n=40)
    ev = EvalSet(context=train, targets=val, weights=w)
    with pytest.raises(InputError, match="evaluate.dask_address tcp://127.0.0.1:9: no Dask"):
        import tasks.cluster as cluster_mod

        old, cluster_mod.CONNECT_TIMEOUT_S = cluster_mod.CONNECT_TIMEOUT_S, 2
        try:
            evaluate_scorer(PopRec.fit(train), ev, batch_size=16, address="tcp://127.0.0.1:9")
        finally:
            cluster_mod.CONNECT_TIMEOUT_S = old
