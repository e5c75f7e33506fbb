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

from dpo4rec.align.reliability import split_half_reliability
from dpo4rec.align.reward_stage import reward_scorer, split_user_indices
from dpo4rec.encode import read_embeddings
from dpo4rec.recommend import reward_model_name
from dpo4rec.recommend.reward import REWARDS
from dpo4rec.run import load_run_config


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
    results = {kind: split_half_reliability(scorer, embeddings, users, kind, config.data.seed) for kind in REWARDS}
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
