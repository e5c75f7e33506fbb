"""Rankings without a model, printed beside every trained one.

* random: seeded uniform scores (the chance level of the metrics);
* popularity: how often train users interacted with the item (negatives are
  sampled uniformly, so this is a strong floor on these lists).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dpo4rec.metrics import mean_metrics, rerank_metrics


def random_scores(items: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N, L) uniform scores."""
    return np.random.default_rng([seed, 7]).random(items.shape)


def popularity_scores(items: np.ndarray, interactions: pd.DataFrame, users: pd.DataFrame) -> np.ndarray:
    """(N, L) counts of each candidate among train users' interactions."""
    train_users = users.loc[users["split"].astype(str) == "train", "user_index"]
    seen = interactions.loc[interactions["user_index"].isin(train_users), "item_index"].to_numpy()
    counts = np.bincount(seen, minlength=int(items.max()) + 1).astype(np.float64)
    return counts[items]


def baseline_metrics(items: np.ndarray, labels: np.ndarray, interactions: pd.DataFrame, users: pd.DataFrame, seed: int = 0) -> dict[str, dict[str, float]]:
    """Mean metrics of the random and popularity rankings on the given lists."""
    return {
        "random": mean_metrics(rerank_metrics(labels, random_scores(items, seed))),
        "popularity": mean_metrics(rerank_metrics(labels, popularity_scores(items, interactions, users))),
    }
