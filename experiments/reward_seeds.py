"""Is a user's best text a property of the text, or of the one recommender that scored it?

    python experiments/reward_seeds.py RUN --out SCRATCH [--seeds 5] [--rewards loglik listwise ndcg] [--any-text] [--no-history]

Split-half reliability (experiments/reward_reliability.py) asks whether one
trained reward recommender orders a user's texts the same way on two halves
of the user's lists. It cannot see noise that belongs to the model: trained
again with another seed (same data, same texts, same settings, as good on
validation), a recommender may prefer other texts. Here the run's held-out
reward recommender is trained with ``--seeds`` seeds, and for each reward:

* across seeds: the within-user correlation of two seeds' rewards of the
  validation users' samples, and how often seed j orders a pair that seed i
  orders (pair agreement, chance 0.5), over every two seeds;
* the ensemble (the mean reward of the first k seeds, k = 1 and all): its
  split-half reliability and the reward probe (experiments/reward_probe.py),
  i.e. whether averaging out the model's own noise leaves something another
  user's texts predict.

``--any-text`` trains each seed as experiments/augmented_reward.py's
"any text" variant, ``--no-history`` on lists whose recent history is blanked (the
text is then the recommenders' only view of the user). Rewards go to SCRATCH/k<k>/<reward>/round_<t>/preferences/;
a summary to SCRATCH/reward_seeds.json. The run folder is only read.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import numpy as np

import reward_probe
from augmented_reward import any_text_knowledge, run_inputs, sampled_users
from scratch import link_from_run
from dpo4rec.align.reliability import agreement, split_half_reliability
from dpo4rec.artifacts import read_parquet, write_parquet
from dpo4rec.config import REWARDS
from dpo4rec.recommend import RewardScorer
from dpo4rec.recommend.reward import EnsembleScorer
from dpo4rec.recommend.train import build_recommender, evaluate, train_recommender


def fmt(r: dict, key: str) -> str:
    return f"{r[key]:.3f} [{r[key + '_ci95'][0]:.3f}, {r[key + '_ci95'][1]:.3f}]" if key in r else "-"


def train_seeds(config, frames: dict, lists, emb, greedy, seeds: int, any_text_users: np.ndarray | None = None):
    """``seeds`` held-out reward recommenders (recommend.seed, seed + 1, ...) as the run trains its one: their
    scorers, and each one's validation MAP@5. ``any_text_users``: train as augmented_reward.py's "any text"."""
    scorers, summary = [], {"seeds": []}
    for k in range(seeds):
        recommend = dataclasses.replace(config.recommend, seed=config.recommend.seed + k)
        knowledge = greedy if any_text_users is None else any_text_knowledge(greedy, emb, any_text_users, recommend.seed)
        model = build_recommender(recommend, frames["items"], lists, emb.dim, (emb.item_index, emb.item_vectors), emb.encoder)
        result = train_recommender(model, lists, knowledge, recommend, progress=False)
        validation = float(np.mean(evaluate(model, lists.of_split("validation"), greedy)["map@5"]))
        summary["seeds"].append({"seed": recommend.seed, "validation_map@5": validation, "best_epoch": result.best_epoch})
        print(f"seed {recommend.seed}: validation MAP@5 {validation:.4f} (greedy texts), epoch {result.best_epoch}, {result.seconds:.0f} s", flush=True)
        scorers.append(RewardScorer(model, lists))
    return scorers, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="scratch folder (the run is only read)")
    parser.add_argument("--round", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rewards", nargs="+", choices=REWARDS, default=["loglik", "listwise", "ndcg"])
    parser.add_argument("--users", type=int, nargs="+", default=[50, 195], help="train users the probe fits on")
    parser.add_argument("--any-text", action="store_true", help="train each seed on any of a sampled user's texts")
    parser.add_argument("--no-history", action="store_true",
                        help="blank every list's recent history (train and score): the text is the recommenders' only view of the user")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        raise SystemExit("--seeds must be at least 2")

    config, frames, lists, emb, greedy = run_inputs(args.run, args.round, history=not args.no_history)
    here = args.run / f"round_{args.round}"
    sampled = sampled_users(frames, emb)
    texts = read_parquet(here / "knowledge" / "knowledge.parquet")[["user_index", "sample", "text"]]

    scorers, summary = train_seeds(config, frames, lists, emb, greedy, args.seeds, sampled["train"] if args.any_text else None)

    for kind in args.rewards:
        scored = [scorer.score_embeddings(emb, split="validation", users=sampled["validation"], reward=kind) for scorer in scorers]
        across = []
        for i, j in itertools.combinations(range(args.seeds), 2):
            a, b = scored[i], scored[j]
            samples = a["sample"].to_numpy() > 0
            a, b = a[samples], b[samples]
            centred = [t["reward"] - t.groupby("user_index")["reward"].transform("mean") for t in (a, b)]
            across.append({"seeds": [i, j], "within_user_correlation": float(centred[0].corr(centred[1])), **agreement(a, b)})
        row = {"reward": kind, "across_seeds": across,
               "within_user_correlation_mean": float(np.mean([c["within_user_correlation"] for c in across])),
               "pair_agreement_mean": float(np.mean([c["pair_agreement"] for c in across])), "ensembles": {}}
        print(f"\n{kind}, validation users' samples, over {len(across)} pairs of seeds: within-user correlation "
              f"{row['within_user_correlation_mean']:+.3f}, pair agreement {row['pair_agreement_mean']:.3f} "
              f"(seeds 0 and 1: {fmt(across[0], 'pair_agreement')})", flush=True)
        for size in sorted({1, args.seeds}):
            ensemble = EnsembleScorer(scorers[:size])
            reliability = split_half_reliability(ensemble, emb, sampled["validation"], kind, config.data.seed)
            folder = args.out / f"k{size}" / kind
            for split, list_split, file in (("train", "reward", "rewards.parquet"), ("validation", "validation", "validation_rewards.parquet")):
                table = ensemble.score_embeddings(emb, split=list_split, users=sampled[split], reward=kind)
                write_parquet(folder / f"round_{args.round}" / "preferences" / file, table.merge(texts, on=["user_index", "sample"], how="left"))
            link_from_run(args.run, folder, "data", "prompts", "cache", "config.json")  # what the probe reads besides the rewards
            print(f"\n{kind}, mean of {size} seed(s): split-half pair agreement {fmt(reliability, 'pair_agreement')}, "
                  f"best-worst {fmt(reliability, 'best_worst_agreement')}; reward probe:", flush=True)
            reward_probe.main([str(folder), "--round", str(args.round), "--users", *map(str, args.users),
                               "--alpha", "1", "10", "--json", str(folder / "probe.json")])
            row["ensembles"][size] = {"reliability": reliability, "probe": json.loads((folder / "probe.json").read_text())}
        summary[kind] = row
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "reward_seeds.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
