"""Does the reward have signal at all? Its split-half reliability on validation users.

A pair teaches DPO something about users it never saw only if the reward's
preference between two texts is a property of the texts, not of which lists
happened to be scored. Each validation user's validation lists are split in
two halves by position (alternate lists); every sample is rewarded on each
half (leaving out lists without a positive, as every reward does); over every two samples whose half-A rewards differ,
the share that half B orders the same way (a tie on B counts half; chance
0.5), with a 95% bootstrap interval over users. It is the ceiling of what
held-out pair accuracy can show, and a reward near 0.5 here makes pairs that
are noise (docs/results.md, "Which reward has resolution?").
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from dpo4rec.best_worst import best_and_worst
from dpo4rec.stats import paired_bootstrap


def agreement(a: pd.DataFrame, b: pd.DataFrame, seed: int = 0) -> dict:
    """Pairs ordered by reward table ``a`` (strictly), scored by whether table ``b`` orders them the same way.

    Tables: user_index, sample, reward. Also each user's best-vs-worst pair on ``a`` alone. Users whose ``a``
    rewards all tie (or with a reward missing on ``b``) count as tied and give no pair.
    """
    users, hits, bw_users, bw_hits, tied = [], [], [], [], 0
    for user, frame in a.groupby("user_index"):
        ra = frame.set_index("sample")["reward"].dropna()
        rb = b[b["user_index"] == user].set_index("sample")["reward"].reindex(ra.index)
        if ra.nunique() < 2 or rb.isna().any():
            tied += 1
            continue
        da = ra.to_numpy()[:, None] - ra.to_numpy()[None, :]
        db = rb.to_numpy()[:, None] - rb.to_numpy()[None, :]
        upper = np.triu(np.ones_like(da, bool), 1) & (da != 0)
        user_hits = np.where(db[upper] == 0, 0.5, (np.sign(da[upper]) == np.sign(db[upper])).astype(float))
        users += [user] * len(user_hits)
        hits += user_hits.tolist()
        best, worst = best_and_worst(frame).iloc[0]
        diff = rb[best] - rb[worst]
        bw_users.append(user)
        bw_hits.append(0.5 if diff == 0 else float(diff > 0))
    out = {"users": int(a["user_index"].nunique()), "tied_users": tied}
    for name, u, h in (("pair_agreement", users, hits), ("best_worst_agreement", bw_users, bw_hits)):
        if h:
            value, ci = paired_bootstrap(np.asarray(u), np.asarray(h), np.zeros(len(h)), seed=seed)
            out.update({name: value, f"{name}_ci95": list(ci), f"{name}_pairs": len(h)})
    return out


def halves(scorer, users: np.ndarray):
    """A copy of ``scorer`` whose lists of ``users`` in split "validation" are relabelled "half_a" / "half_b"
    alternately (in list order); the scorer itself is left as it was."""
    split = scorer.lists.split.copy()
    owner = scorer.lists.user_index.numpy()
    rows = np.flatnonzero((split == "validation") & np.isin(owner, users))
    rank = pd.Series(rows).groupby(owner[rows]).cumcount().to_numpy()
    split[rows] = np.where(rank % 2 == 0, "half_a", "half_b")
    return scorer.with_lists(dataclasses.replace(scorer.lists, split=split))


def split_half_reliability(scorer, embeddings, users: np.ndarray, reward: str, seed: int = 0) -> dict:
    """``agreement`` of ``reward`` between the two halves of each of ``users``' validation lists, over their
    sampled texts (sample > 0). Users with fewer than two validation lists have no halves and are left out."""
    owner = scorer.lists.user_index.numpy()
    counts = pd.Series(owner[scorer.lists.split == "validation"]).value_counts()
    users = np.asarray([u for u in users if counts.get(u, 0) >= 2], dtype=np.int64)
    if len(users) == 0:
        return {"users": 0, "tied_users": 0}
    halved = halves(scorer, users)
    keep = (embeddings.sample > 0) & np.isin(embeddings.user_index, users)
    rewards = {half: pd.DataFrame({"user_index": embeddings.user_index[keep], "sample": embeddings.sample[keep],
                                   "reward": halved.score(embeddings.user_index[keep], embeddings.user_vectors[keep], half,
                                                          reward=reward)})
               for half in ("half_a", "half_b")}
    return agreement(rewards["half_a"], rewards["half_b"], seed)
