"""Best-vs-worst preference pairs from per-sample rewards (DPO4Rec, Sec. 3.3).

For each user, the sampled text with the highest reward is ``chosen`` and the
one with the lowest is ``rejected``; users whose rewards barely differ carry
no preference and are skipped. Only sampled texts (sample >= 1) compete: the
greedy text is test-time knowledge, not a candidate.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def make_pairs(rewards: pd.DataFrame, knowledge: pd.DataFrame, prompts: pd.DataFrame, min_gap: float) -> pd.DataFrame:
    """One row per user with a preference.

    rewards: user_index, sample, reward; knowledge: user_index, sample, text;
    prompts: user_index, message. Returns user_index, prompt, chosen,
    rejected, reward_chosen, reward_rejected, sample_chosen, sample_rejected.
    """
    table = rewards[rewards["sample"] > 0].merge(knowledge[["user_index", "sample", "text"]], on=["user_index", "sample"])
    # ties broken by sample number, so the pairs do not depend on row order
    table = table.sort_values(["user_index", "reward", "sample"], ascending=[True, False, True], kind="stable")
    best = table.groupby("user_index").head(1).set_index("user_index")
    worst = table.sort_values(["user_index", "reward", "sample"], ascending=[True, True, True], kind="stable").groupby("user_index").head(1).set_index("user_index")
    pairs = pd.DataFrame({
        "reward_chosen": best["reward"], "reward_rejected": worst["reward"],
        "chosen": best["text"], "rejected": worst["text"],
        "sample_chosen": best["sample"], "sample_rejected": worst["sample"],
    })
    pairs = pairs[(pairs["reward_chosen"] - pairs["reward_rejected"] > min_gap) & (pairs["chosen"] != pairs["rejected"])]
    pairs = pairs.join(prompts.set_index("user_index")["message"].rename("prompt"), how="inner")
    return pairs.reset_index()[["user_index", "prompt", "chosen", "rejected", "reward_chosen", "reward_rejected", "sample_chosen", "sample_rejected"]]


def reward_spread(rewards: pd.DataFrame) -> dict:
    """How much the N samples of a user differ in reward: DPO has nothing to learn when they don't."""
    sampled = rewards[rewards["sample"] > 0]
    per_user = sampled.groupby("user_index")["reward"]
    gap = per_user.max() - per_user.min()
    return {
        "users": int(per_user.ngroups),
        "reward_mean": float(sampled["reward"].mean()) if len(sampled) else float("nan"),
        "within_user_std_mean": float(per_user.std().mean()) if len(sampled) else float("nan"),
        "best_minus_worst_mean": float(gap.mean()) if len(gap) else float("nan"),
        "best_minus_worst_quantiles": {q: float(np.quantile(gap, q)) for q in (0.1, 0.5, 0.9)} if len(gap) else {},
        "users_with_tied_samples": int((gap <= 0).sum()),
    }
