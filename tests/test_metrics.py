import math

import numpy as np
import pytest

from dpo4rec.metrics import mean_metrics, rerank_metrics


def _reference(labels, scores, k):
    """An independent, loop-based version of KAR's definitions."""
    ranked = [label for _, label in sorted(zip(scores, labels), key=lambda pair: pair[0], reverse=True)]
    dcg = sum((2**label - 1) / math.log2(i + 2) for i, label in enumerate(ranked[:k]))
    ideal = sorted(labels, reverse=True)
    idcg = sum((2**label - 1) / math.log2(i + 2) for i, label in enumerate(ideal[:k]))
    hits, precisions = 0, []
    for i, label in enumerate(ranked[:k]):
        if label > 0:
            hits += 1
            precisions.append(hits / (i + 1))
    return (sum(precisions) / hits if hits else 0.0), (dcg / idcg if idcg else 0.0)


def test_hand_computed_values():
    labels = np.array([[0, 1, 0, 1]])
    scores = np.array([[0.9, 0.8, 0.7, 0.1]])  # ranking: 0, 1, 0, 1
    m = rerank_metrics(labels, scores, ks=(1, 3, 4))
    assert m["map@1"][0] == 0.0
    assert m["ndcg@1"][0] == 0.0
    assert m["map@3"][0] == pytest.approx(1 / 2)  # one hit at rank 2: precision 1/2
    assert m["map@4"][0] == pytest.approx((1 / 2 + 2 / 4) / 2)
    dcg3 = 1 / math.log2(3)
    idcg3 = 1 + 1 / math.log2(3)
    assert m["ndcg@3"][0] == pytest.approx(dcg3 / idcg3)


def test_perfect_ranking_scores_one_and_no_positive_scores_zero():
    labels = np.array([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    scores = np.array([[5, 4, 3, 2, 1], [1, 2, 3, 4, 5]], dtype=float)
    m = rerank_metrics(labels, scores)
    for k in (1, 3, 5, 7):
        assert m[f"map@{k}"][0] == 1.0 and m[f"ndcg@{k}"][0] == 1.0
        assert m[f"map@{k}"][1] == 0.0 and m[f"ndcg@{k}"][1] == 0.0


def test_ties_keep_list_order():
    labels = np.array([[0, 1], [1, 0]])
    scores = np.zeros((2, 2))
    m = rerank_metrics(labels, scores, ks=(1,))
    assert list(m["map@1"]) == [0.0, 1.0]


def test_graded_labels_use_exponential_gain():
    labels = np.array([[1, 2]])
    scores = np.array([[1.0, 0.0]])
    m = rerank_metrics(labels, scores, ks=(2,))
    dcg = 1 + 3 / math.log2(3)
    idcg = 3 + 1 / math.log2(3)
    assert m["ndcg@2"][0] == pytest.approx(dcg / idcg)


def test_matches_loop_reference_on_random_lists():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(300, 10))
    scores = rng.integers(0, 4, size=(300, 10)).astype(float)  # many ties
    m = rerank_metrics(labels, scores)
    for row in range(300):
        for k in (1, 3, 5, 7):
            ap, ndcg = _reference(list(labels[row]), list(scores[row]), k)
            assert m[f"map@{k}"][row] == pytest.approx(ap)
            assert m[f"ndcg@{k}"][row] == pytest.approx(ndcg)


def test_k_beyond_list_length_and_bad_shapes():
    m = rerank_metrics(np.array([[1, 0]]), np.array([[0.0, 1.0]]), ks=(7,))
    assert m["map@7"][0] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        rerank_metrics(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError):
        rerank_metrics(np.zeros((1, 2)), np.array([[np.nan, 0.0]]))


def test_mean_metrics():
    m = mean_metrics({"map@1": np.array([1.0, 0.0])})
    assert m == {"map@1": 0.5}
