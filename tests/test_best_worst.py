"""One rule for best, worst and ties: every consumer of rewards names the same two samples of a user."""

from types import SimpleNamespace

import numpy as np
import pandas as pd

from dpo4rec.heldout.stage import pair_margins
from dpo4rec.reward.pairs import make_pairs
from dpo4rec.reward.reliability import agreement
from dpo4rec.best_worst import best_and_worst
from dpo4rec.recommend.stage import best_text_vectors

# user 7: samples 1 and 2 tie for best, 3 and 4 tie for worst -> best 1 (lowest sample), worst 4 (highest sample);
# user 9: one sample without a reward (left out), the rest all tie -> best 1, worst 3
REWARDS = pd.DataFrame({"user_index": [7, 7, 7, 7, 9, 9, 9, 9], "sample": [3, 1, 4, 2, 2, 1, 4, 3],
                        "reward": [0.0, 1.0, 0.0, 1.0, 0.5, 0.5, np.nan, 0.5]})


def test_the_rule_breaks_ties_towards_two_different_texts():
    ends = best_and_worst(REWARDS)
    assert ends.loc[7].tolist() == [1, 4] and ends.loc[9].tolist() == [1, 3]
    assert best_and_worst(REWARDS.sample(frac=1, random_state=3)).equals(ends)  # row order does not matter


def test_pairs_heldout_reliability_and_best_text_pick_the_same_samples():
    knowledge = REWARDS[["user_index", "sample"]].assign(text=[f"text {u}-{s}" for u, s in zip(REWARDS["user_index"], REWARDS["sample"])])
    prompts = pd.DataFrame({"user_index": [7, 9], "message": ["p7", "p9"]})
    pairs = make_pairs(REWARDS, knowledge, prompts, min_gap=-1.0)  # min_gap < 0 keeps the tied user's pair
    assert pairs[["user_index", "sample_chosen", "sample_rejected"]].values.tolist() == [[7, 1, 4], [9, 1, 3]]

    every = make_pairs(REWARDS, knowledge, prompts, "all_gaps", min_gap=-1.0)  # the held-out check marks the same pair
    texts = pd.concat([every[["user_index", "sample_chosen"]].set_axis(["user_index", "sample"], axis=1),
                       every[["user_index", "sample_rejected"]].set_axis(["user_index", "sample"], axis=1)]).drop_duplicates()
    texts = texts.assign(policy=0.0, reference=0.0)
    marked = pair_margins(every, texts, beta=0.1)
    assert marked.loc[marked["best_worst"], ["user_index", "sample_chosen", "sample_rejected"]].values.tolist() == [[7, 1, 4], [9, 1, 3]]

    # a second reward table that agrees on the (1, 4) and (1, 3) orders and on no other pair of these users
    other = pd.DataFrame({"user_index": [7] * 4 + [9] * 3, "sample": [1, 2, 3, 4, 1, 2, 3], "reward": [1, -10, 10, 0, 1, 10, 0]})
    assert agreement(REWARDS[REWARDS["user_index"] == 7], other)["best_worst_agreement"] == 1.0
    assert agreement(REWARDS, other)["best_worst_agreement"] == 1.0  # user 9's a-table ties: no pair, as in DPO's gap filter

    emb = SimpleNamespace(user_index=np.array([7, 7, 7, 7]), sample=np.array([1, 2, 3, 4]), user_vectors=np.eye(4, dtype=np.float32))
    users_table = pd.DataFrame({"user_index": [7], "split": ["train"]})
    users, vectors, counts = best_text_vectors(emb, np.array([7]), np.zeros((1, 4), np.float32), REWARDS[REWARDS["user_index"] == 7], users_table)
    assert vectors[0].tolist() == [1, 0, 0, 0] and counts["train_users_not_greedy"] == 1  # sample 1's vector
