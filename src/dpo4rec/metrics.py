"""Re-ranking metrics with KAR's definitions (arXiv 2306.10933), vectorized.

Every list is ranked by score, descending, with ties kept in list order (a
stable sort, as Python's ``sorted(..., reverse=True)`` in KAR's evaluation).

* NDCG@K: DCG with gain ``2**label - 1`` and discount ``log2(rank + 1)``,
  divided by the ideal DCG@K from the same labels; 0 where a list has no
  positive.
* MAP@K: the mean of precision@i over the hit positions i <= K; 0 where the
  top K hold no hit.

Both return one value per list so that callers can average per list (the
headline), per user (the DPO reward) or bootstrap over users.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_KS = (1, 3, 5, 7)


def rank_by_score(scores: np.ndarray) -> np.ndarray:
    """Column order that sorts each row by descending score, ties in list order."""
    # Negating keeps a stable sort stable for descending order; -0.0 == 0.0.
    return np.argsort(-np.asarray(scores, dtype=np.float64), axis=1, kind="stable")


def rerank_metrics(
    labels: np.ndarray, scores: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, np.ndarray]:
    """Per-list ``map@K`` and ``ndcg@K`` for ``(n_lists, list_len)`` arrays.

    ``labels`` are relevance grades (0/1 for the protocol's lists); a label
    above 0 counts as a hit for MAP.
    """
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 2 or labels.shape != scores.shape:
        raise ValueError(
            f"labels and scores must be 2-D arrays of one shape, got {labels.shape} and {scores.shape}"
        )
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    list_len = labels.shape[1]
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"every K must be >= 1, got {ks}")

    ranked = np.take_along_axis(labels, rank_by_score(scores), axis=1)  # (n, L)
    ideal = -np.sort(-labels, axis=1)  # (n, L), labels descending
    discount = 1.0 / np.log2(np.arange(2, list_len + 2))  # (L,)
    dcg = np.cumsum((np.exp2(ranked) - 1.0) * discount, axis=1)  # (n, L) DCG@1..L
    idcg = np.cumsum((np.exp2(ideal) - 1.0) * discount, axis=1)

    hits = (ranked > 0).astype(np.float64)  # (n, L)
    n_hits = np.cumsum(hits, axis=1)  # hits within the top i
    precision_at_hits = hits * n_hits / np.arange(1, list_len + 1)  # precision@i where i hits
    ap_sum = np.cumsum(precision_at_hits, axis=1)

    out: dict[str, np.ndarray] = {}
    for k in ks:
        col = min(k, list_len) - 1
        with np.errstate(divide="ignore", invalid="ignore"):
            out[f"map@{k}"] = np.where(n_hits[:, col] > 0, ap_sum[:, col] / n_hits[:, col], 0.0)
            out[f"ndcg@{k}"] = np.where(idcg[:, col] > 0, dcg[:, col] / idcg[:, col], 0.0)
    return out


def mean_metrics(per_list: dict[str, np.ndarray]) -> dict[str, float]:
    """The headline numbers: each metric averaged over lists."""
    return {name: float(values.mean()) if values.size else float("nan") for name, values in per_list.items()}
