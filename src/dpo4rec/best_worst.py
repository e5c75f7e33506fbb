"""One rule for a user's best and worst text, used by every stage that picks them.

Best = the highest reward, ties to the lowest sample number; worst = the lowest
reward, ties to the highest sample number. So the best and the worst of a user
whose rewards all tie are two different texts (when there are two), and the pair
builder, the held-out check, the reward's reliability and probe, and the
best-text recommender all name the same two samples for a user. Rows without a
reward (NaN) are left out.
"""

from __future__ import annotations

import pandas as pd


def order_by_reward(table: pd.DataFrame, reward: str = "reward") -> pd.DataFrame:
    """``table`` (user_index, sample, ``reward``) without its NaN rewards, sorted by user, then best first,
    worst last by the rule above."""
    rows = table[table[reward].notna()]
    return rows.sort_values(["user_index", reward, "sample"], ascending=[True, False, True], kind="stable")


def best_and_worst(table: pd.DataFrame, reward: str = "reward") -> pd.DataFrame:
    """Per user_index (the index, ascending): its ``best`` and ``worst`` sample numbers."""
    ordered = order_by_reward(table, reward).groupby("user_index", sort=True)["sample"]
    return pd.DataFrame({"best": ordered.first(), "worst": ordered.last()})
