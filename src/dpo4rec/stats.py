"""Paired bootstrap intervals over users for differences of list-averaged metrics."""

from __future__ import annotations

import numpy as np


def paired_bootstrap(
    users: np.ndarray, a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, tuple[float, float]]:
    """Difference ``mean(a) - mean(b)`` over lists, and its interval resampling users.

    ``users``, ``a``, ``b``: one entry per list, the same lists in both arms.
    Users (not lists) are resampled, since one user's lists are not
    independent; each resampled user brings all of their lists, so the
    statistic stays a mean over lists like the headline number.
    """
    users, a, b = np.asarray(users), np.asarray(a, float), np.asarray(b, float)
    ids, inverse = np.unique(users, return_inverse=True)
    diff_sum = np.bincount(inverse, weights=a - b, minlength=len(ids))  # (U,)
    n_lists = np.bincount(inverse, minlength=len(ids)).astype(float)
    point = float(diff_sum.sum() / n_lists.sum())
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(ids), np.full(len(ids), 1.0 / len(ids)), size=n_boot)  # (B, U)
    boots = counts @ diff_sum / (counts @ n_lists)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(boots, [tail, 100 - tail])
    return point, (float(low), float(high))
