"""Preference pairs from per-sample rewards (DPO4Rec, Sec. 3.3, and wider pairings).

Only sampled texts (sample >= 1) compete: the greedy text is test-time
knowledge, not a candidate. Samples without a reward (NaN: the user has no
list with a positive) are left out. Pairings (``align.pairing``):

* ``best_worst``: the paper's one pair per user, highest against lowest reward;
* ``all_gaps``: every two samples whose rewards differ (the held-out check's pairs).

Every pairing drops pairs whose rewards differ by no more than ``min_gap``
(0: tied samples make no pair) and pairs of identical texts. Ties in reward are broken by
sample number (best_worst.py, the rule every stage uses), so the pairs never
depend on row order.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dpo4rec.best_worst import order_by_reward

COLUMNS = ["user_index", "prompt", "chosen", "rejected", "reward_chosen", "reward_rejected", "sample_chosen",
           "sample_rejected", "tokens_chosen", "tokens_rejected"]


def make_pairs(rewards: pd.DataFrame, knowledge: pd.DataFrame, prompts: pd.DataFrame, pairing: str = "best_worst",
               min_gap: float = 0.0) -> pd.DataFrame:
    """Pairs as rows of ``COLUMNS``.

    rewards: user_index, sample, reward; knowledge: user_index, sample, text
    (and n_tokens, when known); prompts: user_index, message.
    """
    columns = ["user_index", "sample", "text"] + (["n_tokens"] if "n_tokens" in knowledge else [])
    table = rewards[(rewards["sample"] > 0) & rewards["reward"].notna()].merge(knowledge[columns], on=["user_index", "sample"])
    if "n_tokens" not in table:
        table["n_tokens"] = -1
    table = order_by_reward(table)
    chosen, rejected = [], []
    for _, group in table.groupby("user_index", sort=True):
        n = len(group)
        if pairing == "best_worst":
            index = [(0, n - 1)]
        elif pairing == "all_gaps":
            index = [(i, j) for i in range(n) for j in range(i + 1, n)]
        else:
            raise ValueError(f"unknown pairing {pairing!r}")
        chosen += [group.index[i] for i, _ in index]
        rejected += [group.index[j] for _, j in index]
    a, b = table.loc[chosen].reset_index(drop=True), table.loc[rejected].reset_index(drop=True)
    pairs = pd.DataFrame({
        "user_index": a["user_index"], "chosen": a["text"], "rejected": b["text"],
        "reward_chosen": a["reward"], "reward_rejected": b["reward"],
        "sample_chosen": a["sample"], "sample_rejected": b["sample"],
        "tokens_chosen": a["n_tokens"], "tokens_rejected": b["n_tokens"],
    })
    pairs = pairs[(pairs["reward_chosen"] - pairs["reward_rejected"] > min_gap) & (pairs["chosen"] != pairs["rejected"])]
    pairs = pairs.merge(prompts[["user_index", "message"]].rename(columns={"message": "prompt"}), on="user_index", how="inner")
    return pairs[COLUMNS].reset_index(drop=True)


def reward_spread(rewards: pd.DataFrame, pairs: pd.DataFrame | None = None) -> dict:
    """How much the N samples of a user differ in reward (DPO has nothing to learn when they don't), and the pairs' lengths."""
    sampled = rewards[(rewards["sample"] > 0) & rewards["reward"].notna()]
    per_user = sampled.groupby("user_index")["reward"]
    gap = per_user.max() - per_user.min()
    spread = {
        "users": int(per_user.ngroups),
        "users_without_reward": int(rewards.loc[(rewards["sample"] > 0) & rewards["reward"].isna(), "user_index"].nunique()),
        "reward_mean": float(sampled["reward"].mean()) if len(sampled) else float("nan"),
        "within_user_std_mean": float(per_user.std().mean()) if len(sampled) else float("nan"),
        "best_minus_worst_mean": float(gap.mean()) if len(gap) else float("nan"),
        "best_minus_worst_quantiles": {q: float(np.quantile(gap, q)) for q in (0.1, 0.5, 0.9)} if len(gap) else {},
        "users_with_tied_samples": int((gap <= 0).sum()),
    }
    if pairs is not None and len(pairs) and (pairs["tokens_chosen"] >= 0).all():
        spread["chosen_tokens_mean"] = float(pairs["tokens_chosen"].mean())
        spread["rejected_tokens_mean"] = float(pairs["tokens_rejected"].mean())
        spread["chosen_longer_share"] = float((pairs["tokens_chosen"] > pairs["tokens_rejected"]).mean())
    return spread
