"""Would a reward from a recommender that reads the text *instead of* the history give DPO something to learn?

    python experiments/text_only_reward.py RUN --out SCRATCH [--round 0]

The run's reward recommender sees each list's candidates, the user's recent
history (item ids) and the knowledge vector. The history already says what the
text can say, so which of a user's texts scores best is a small perturbation
the reward probe (experiments/reward_probe.py) found no shared direction in.
Here the same held-out reward recommender (greedy texts, each train user's
last lists held out) is trained and scored with every list's history emptied:
the text is the only thing that tells it who the user is. Its rewards for the
run's sampled train and validation texts go to SCRATCH/round_<t>/preferences/
and the reward probe runs on them, with the run's own rewards beside it. The
run folder is only read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

import reward_probe
from scratch import link_from_run
from dpo4rec.artifacts import read_parquet, write_parquet
from dpo4rec.encode import read_embeddings
from dpo4rec.recommend import RewardScorer
from dpo4rec.recommend.features import list_tensors, mark_reward_lists, user_knowledge
from dpo4rec.recommend.train import build_recommender, evaluate, train_recommender
from dpo4rec.run import load_run_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="scratch folder (the run is only read)")
    parser.add_argument("--round", type=int, default=0)
    args = parser.parse_args(argv)

    config = load_run_config(args.run)
    data, here = args.run / "data", args.run / f"round_{args.round}"
    frames = {name: read_parquet(data / f"{name}.parquet") for name in ("items", "lists", "users")}
    lists = list_tensors(mark_reward_lists(frames["lists"], config.align.held_out_share or 0.25))
    lists.history.zero_()  # no history: the text alone says who the user is
    emb = read_embeddings(here / "embeddings", config.recommend.item_knowledge)
    users, vectors = emb.for_sample(0)
    knowledge = user_knowledge(len(frames["users"]), users, vectors, str(here / "embeddings"))
    model = build_recommender(config.recommend, frames["items"], lists, emb.dim, (emb.item_index, emb.item_vectors), emb.encoder)
    train_recommender(model, lists, knowledge, config.recommend)
    validation = evaluate(model, lists.of_split("validation"), knowledge)
    print(f"text-only recommender: validation MAP@5 {np.mean(validation['map@5']):.4f} (greedy texts)")

    scorer = RewardScorer(model, lists)
    knowledge_texts = read_parquet(here / "knowledge" / "knowledge.parquet")[["user_index", "sample", "text"]]
    out = args.out / f"round_{args.round}" / "preferences"
    for split, list_split, name in (("train", "reward", "rewards.parquet"), ("validation", "validation", "validation_rewards.parquet")):
        in_split = frames["users"].loc[frames["users"]["split"].astype(str) == split, "user_index"].to_numpy()
        sampled = np.unique(emb.user_index[(emb.sample > 0) & np.isin(emb.user_index, in_split)])
        rewards = scorer.score_embeddings(emb, split=list_split, users=sampled, reward=config.align.reward)
        write_parquet(out / name, rewards.merge(knowledge_texts, on=["user_index", "sample"], how="left"))
        ours = pd.read_parquet(here / "preferences" / name).set_index(["user_index", "sample"])["reward"]
        joined = rewards.set_index(["user_index", "sample"])["reward"].to_frame("text_only").join(ours.rename("run"))
        centred = joined - joined.groupby(level=0).transform("mean")
        print(f"{split}: {len(sampled)} users; within-user correlation of text-only and the run's rewards "
              f"{centred['text_only'].corr(centred['run']):+.3f}")
    link_from_run(args.run, args.out, "data", "prompts", "cache", "config.json")  # what the probe reads besides the rewards
    print("\nreward probe on the text-only rewards:")
    return reward_probe.main([str(args.out), "--round", str(args.round), "--users", "50", "195", "--alpha", "1", "10"])


if __name__ == "__main__":
    sys.exit(main())
