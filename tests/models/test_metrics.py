"""Vectorised metrics against an obviously-correct per-user loop and hand-computed cases."""

import math

import numpy as np
import pytest
import scipy.sparse as sp

from models.metrics import (
    RankingAccumulator,
    evaluate_scores,
    pooled_auc,
    propensity_weights,
    sample_negatives,
    top_k_unseen,
)


def loop_metrics(scores, targets, seen, weights, negatives, ks=(10, 100)):
    """algorithms.md, literally: one user at a time, plain Python."""
    sums, n_users = {}, 0
    pos, neg = [], []
    for u in range(scores.shape[0]):
        t = set(np.nonzero(targets[u])[0].tolist())
        s_u = set(np.nonzero(seen[u])[0].tolist())
        for j in t:
            pos.append(scores[u, j])
        if negatives is not None and t:
            neg.extend(scores[u, j] for j in negatives[u])
        if not t:
            continue
        n_users += 1
        candidates = [j for j in range(scores.shape[1]) if j not in s_u]
        ranked = sorted(candidates, key=lambda j: (-scores[u, j], j))
        p = len(t)
        for k in ks:
            top = ranked[:k]
            hits = [i for i, j in enumerate(top) if j in t]
            hr = len(hits) / min(p, k)
            dcg = sum(1 / math.log2(i + 2) for i in hits)
            idcg = sum(1 / math.log2(i + 2) for i in range(min(p, k)))
            gain = sum(weights[top[i]] for i in hits) / min(p, k)
            ideal = sum(sorted((weights[j] for j in t), reverse=True)[: min(p, k)])
            for name, v in (("hr", hr), ("ndcg", dcg / idcg), ("psp", gain / ideal)):
                sums[f"{name}@{k}"] = sums.get(f"{name}@{k}", 0.0) + v
    out = {key: 100 * v / n_users for key, v in sums.items()}
    if negatives is not None:
        # AUC by pair counting
        pairs = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
        out["auc"] = pairs / (len(pos) * len(neg))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_equals_loop_on_random_data(seed):
    rng = np.random.default_rng(seed)
    n, m = 30, 160
    scores = rng.normal(size=(n, m)).astype(np.float32)
    scores[:, :5] = np.round(scores[:, :5])  # some ties
    seen = rng.random((n, m)) < 0.15
    targets = (rng.random((n, m)) < 0.1) & ~seen
    targets[0] = False  # a user without targets is not averaged
    negatives = np.stack([rng.choice(np.nonzero(~(seen[u] | targets[u]))[0], 8, replace=False) for u in range(n)])
    w = propensity_weights(seen.sum(0), int(seen.sum()))
    got = evaluate_scores(scores, sp.csr_matrix(targets), sp.csr_matrix(seen), w, negatives)
    want = loop_metrics(scores, targets, seen, w, negatives)
    assert set(got) == set(want) == {"hr@10", "ndcg@10", "hr@100", "ndcg@100", "psp@10", "psp@100", "auc"}
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-9), key


def test_batched_accumulation_equals_whole():
    rng = np.random.default_rng(5)
    n, m = 50, 120
    scores = rng.normal(size=(n, m)).astype(np.float32)
    seen = sp.csr_matrix(rng.random((n, m)) < 0.1)
    targets = sp.csr_matrix((rng.random((n, m)) < 0.1).astype(np.float32) - seen.multiply(1).toarray() > 0)
    w = propensity_weights(np.asarray(seen.sum(0)).ravel(), seen.nnz)
    whole = evaluate_scores(scores, targets, seen, w)
    acc = RankingAccumulator(weights=w)
    for start in range(0, n, 13):
        sl = slice(start, start + 13)
        acc.add(top_k_unseen(scores[sl], seen[sl], 100), targets[sl])
    assert acc.result() == pytest.approx(whole)


def test_hand_computed_small_case():
    # 1 user, 4 items; item 0 seen; scores rank unseen as 3, 1, 2; targets {1, 2}
    scores = np.array([[9.0, 0.5, 0.1, 0.8]], np.float32)
    seen = sp.csr_matrix(np.array([[1, 0, 0, 0]]))
    targets = sp.csr_matrix(np.array([[0, 1, 1, 0]]))
    w = np.array([1.0, 2.0, 4.0, 1.0])
    ranked = top_k_unseen(scores, seen, 3)
    assert ranked.tolist() == [[3, 1, 2]]
    acc = RankingAccumulator(weights=w, ks=(1, 2, 3))
    acc.add(ranked, targets)
    r = acc.sums
    # k=1: no hit → 0 ; k=2: one hit at rank 1 ; k=3: two hits at ranks 1, 2
    assert r["hr@1"] == 0 and r["ndcg@1"] == 0 and r["psp@1"] == 0
    assert r["hr@2"] == pytest.approx(1 / 2)
    assert r["ndcg@2"] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    # PSP@2: numerator (w1)/min(2,2) = 1 ; ideal = w2 + w1 = 6
    assert r["psp@2"] == pytest.approx((2.0 / 2) / 6.0)
    assert r["hr@3"] == pytest.approx(1.0)
    # PSP@3: numerator (2+4)/min(2,3)=3 ; ideal = 4+2
    assert r["psp@3"] == pytest.approx(3.0 / 6.0)


def test_psp_weights_formula():
    counts = np.array([0, 1, 10, 100])
    n_train = 1000
    c = (math.log(n_train) - 1) * (1.5 + 1) ** 0.55
    want = [1 + c * (x + 1.5) ** -0.55 for x in counts]
    np.testing.assert_allclose(propensity_weights(counts, n_train), want)


def test_pooled_auc_hand_case():
    assert pooled_auc([3.0, 1.0], [2.0, 0.0]) == pytest.approx(0.75)
    assert pooled_auc([1.0], [1.0]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        pooled_auc([], [1.0])


def test_negatives_are_unseen_distinct_and_seeded():
    rng = np.random.default_rng(0)
    pos = sp.csr_matrix(rng.random((40, 90)) < 0.3)
    a = sample_negatives(pos, 20, seed=3)
    b = sample_negatives(pos, 20, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, sample_negatives(pos, 20, seed=4))
    dense = pos.toarray()
    for u in range(40):
        assert len(set(a[u])) == 20
        assert not dense[u, a[u]].any()


def test_top_k_masks_seen_and_ranks_nan_last():
    scores = np.array([[0.1, np.nan, 0.9, 0.5, -5.0]], np.float32)
    seen = sp.csr_matrix(np.array([[0, 0, 1, 0, 0]]))
    assert top_k_unseen(scores, seen, 3).tolist() == [[3, 0, 4]]
    assert np.isnan(scores[0, 1]) and scores[0, 2] == np.float32(0.9)  # input untouched


def test_no_target_users_is_an_error():
    acc = RankingAccumulator(weights=np.ones(3))
    acc.add(np.zeros((1, 100), dtype=int)[:, :3], sp.csr_matrix((1, 3)))
    with pytest.raises(ValueError, match="no user"):
        acc.result()


def test_top_k_breaks_ties_at_the_cut_by_lower_index():
    rng = np.random.default_rng(5)
    scores = rng.integers(0, 4, (300, 150)).astype(np.float32)  # ties everywhere, also at the cut
    seen = sp.csr_matrix(rng.random((300, 150)) < 0.1)
    full = top_k_unseen(scores, seen, 100)
    masked = np.where(seen.toarray(), -np.inf, scores)
    for row in range(300):  # the first k of (score desc, index asc)
        expected = np.lexsort((np.arange(150), -masked[row]))[:100]
        np.testing.assert_array_equal(full[row], expected)
    for k in (1, 10, 37):
        np.testing.assert_array_equal(top_k_unseen(scores, seen, k), full[:, :k])
        unsorted = top_k_unseen(scores, seen, k, sort=False)
        np.testing.assert_array_equal(np.sort(unsorted, axis=1), np.sort(full[:, :k], axis=1))


def test_a_user_with_few_unseen_items_gets_them_all_and_auc_skips_the_padding():
    """A small catalog: a user who has seen all but 3 of 12 items gets those 3 as negatives
    (the rest of the row is -1), and the pooled AUC uses exactly the real negatives."""
    pos = sp.csr_matrix(np.array([[1] * 9 + [0] * 3, [1, 0] * 6], dtype=float))
    neg = sample_negatives(pos, 5, seed=0)
    assert sorted(neg[0]) == [-1, -1, 9, 10, 11]
    assert len(set(neg[1])) == 5 and all(j % 2 == 1 for j in neg[1])
    scores = np.arange(24, dtype=float).reshape(2, 12)
    targets = sp.csr_matrix(np.array([[1] + [0] * 11, [1] + [0] * 11], dtype=float))
    acc = RankingAccumulator(weights=np.ones(12))
    acc.add_auc(scores, targets, neg)
    real = [scores[u, j] for u in range(2) for j in neg[u] if j >= 0]
    assert sorted(np.concatenate(acc.neg_scores)) == sorted(real)
    expected = pooled_auc([scores[0, 0], scores[1, 0]], real)
    assert pooled_auc(np.concatenate(acc.pos_scores), np.concatenate(acc.neg_scores)) == expected
    assert sample_negatives(pos, 50, seed=0).shape == (2, 12)  # a catalog under 50 items
