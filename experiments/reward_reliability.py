"""How much signal does each reward carry? Split-half reliability on validation users.

A pair teaches DPO something about users it never saw only if the reward's
preference between two texts is a property of the texts, not noise of which
lists were scored. For each validation user with N samples, the user's
validation lists (those with a positive) are split in two halves by
position (alternate lists); every sample is scored on each half by the
round's reward recommender, for every reward kind. Reported per kind:

* ties: share of users whose samples all tie on half A (no pair);
* pair agreement: over every two samples whose half-A rewards differ, the
  share that half B orders the same way (ties on B count half; chance 0.5):
  how often a pair the reward builds reflects more than the lists it saw,
  the ceiling of what held-out pair accuracy can show; 95% bootstrap
  interval over users;
* best-worst agreement: the same for each user's best-vs-worst pair on A.

    python experiments/reward_reliability.py RUN [--round 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from dpo4rec.align.reward_stage import reward_scorer, split_user_indices
from dpo4rec.encode import read_embeddings
from dpo4rec.recommend import reward_model_name
from dpo4rec.recommend.reward import REWARDS
from dpo4rec.report.bootstrap import paired_bootstrap
from dpo4rec.run import load_run_config


def agreement(a: pd.DataFrame, b: pd.DataFrame, seed: int) -> dict:
    """Pairs ordered by reward A (strictly), scored by whether reward B orders them the same way."""
    users, hits, bw_users, bw_hits, tied = [], [], [], [], 0
    for user, frame in a.groupby("user_index"):
        ra = frame.set_index("sample")["reward"].dropna()
        rb = b[b["user_index"] == user].set_index("sample")["reward"].reindex(ra.index)
        if ra.nunique() < 2 or rb.isna().any():
            tied += 1
            continue
        samples = ra.index.to_numpy()
        for i in range(len(samples)):
            for j in range(i + 1, len(samples)):
                da, db = ra.iloc[i] - ra.iloc[j], rb.iloc[i] - rb.iloc[j]
                if da == 0:
                    continue
                users.append(user)
                hits.append(0.5 if db == 0 else float(np.sign(da) == np.sign(db)))
        best, worst = ra.idxmax(), ra.idxmin()
        db = rb[best] - rb[worst]
        bw_users.append(user)
        bw_hits.append(0.5 if db == 0 else float(db > 0))
    out = {"users": int(a["user_index"].nunique()), "tied_users": tied}
    for name, u, h in (("pair_agreement", users, hits), ("best_worst_agreement", bw_users, bw_hits)):
        if h:
            value, ci = paired_bootstrap(np.asarray(u), np.asarray(h), np.zeros(len(h)), seed=seed)
            out.update({name: value, f"{name}_ci95": list(ci), f"{name}_pairs": len(h)})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--round", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    config = load_run_config(args.run)
    here = args.run / f"round_{args.round}"
    recommender = here / "recommender" / reward_model_name(config.recommend, config.align.held_out_share)
    scorer, _ = reward_scorer(recommender, args.run, config.align)
    embeddings = read_embeddings(here / "embeddings")
    validation = split_user_indices(args.run, "validation")
    users = np.unique(embeddings.user_index[(embeddings.sample > 0) & np.isin(embeddings.user_index, validation)])
    # halves: alternate validation lists of each user (by chunk order)
    split = scorer.lists.split.copy()
    owner = scorer.lists.user_index.numpy()
    rows = np.flatnonzero((split == "validation") & np.isin(owner, users))
    rank = pd.Series(rows).groupby(owner[rows]).cumcount().to_numpy()
    split[rows] = np.where(rank % 2 == 0, "half_a", "half_b")
    scorer.lists.split = split
    keep = (embeddings.sample > 0) & np.isin(embeddings.user_index, users)
    results = {}
    for kind in REWARDS:
        a = pd.DataFrame({"user_index": embeddings.user_index[keep], "sample": embeddings.sample[keep],
                          "reward": scorer.score(embeddings.user_index[keep], embeddings.user_vectors[keep], "half_a", reward=kind)})
        b = a.assign(reward=scorer.score(embeddings.user_index[keep], embeddings.user_vectors[keep], "half_b", reward=kind))
        results[kind] = agreement(a, b, config.data.seed)
    print(f"split-half reliability of the rewards: {args.run}, round {args.round}, {len(users)} validation users with samples")
    print("| reward | users tied on half A | pair agreement [95% CI] (pairs) | best-worst agreement [95% CI] |")
    print("|---|---|---|---|")
    for kind, r in results.items():
        fmt = lambda key: (f"{r[key]:.3f} [{r[key + '_ci95'][0]:.3f}, {r[key + '_ci95'][1]:.3f}]" if key in r else "-")  # noqa: E731
        print(f"| {kind} | {r['tied_users']} / {r['users']} | {fmt('pair_agreement')} ({r.get('pair_agreement_pairs', 0)}) | {fmt('best_worst_agreement')} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
