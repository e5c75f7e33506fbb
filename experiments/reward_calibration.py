"""Is a reward's preference between a user's texts about the text, or about the user's calibration?

    python experiments/reward_calibration.py RUN --out SCRATCH [--round 0] [--users 48 195]

Every sampled text of the run's train users (on their reward lists) and
validation users (on their validation lists) is scored by the round's reward
recommender. Per text: each reward kind, and its shift: the mean of the
model's scores over the user's lists. A pointwise reward ("loglik" under
PRM's and DLCM's Bernoulli loss) rises with the shift for a user whose lists
hold more positives than the model predicts and falls for a user with fewer:
which text wins then depends on the user's calibration gap, and a direction
that is the same for every user (what DPO could carry to unseen users) is
hidden under it. Printed per split: the median within-user correlation of
loglik and shift (absolute), the share of users whose correlation has the
sign of their gap (mean label minus mean predicted probability), the share
of the within-user variance of loglik that the shift explains, and how the
gap goes with the share of the prompt's movies the user rated above the
label threshold (which the LLM sees and the recommender's item ids do not).
Then the reward probe (experiments/reward_probe.py) on the shift and on each
reward kind: whose preferences can a learner fitted on train users predict
on validation users? Writes SCRATCH/<kind>/... for the probe; the run is
only read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import reward_probe
from scratch import link_from_run
from dpo4rec.align.reward_stage import reward_scorer, split_user_indices
from dpo4rec.artifacts import read_parquet, write_parquet
from dpo4rec.encode import read_embeddings
from dpo4rec.recommend import reward_model_name
from dpo4rec.config import REWARDS
from dpo4rec.run import load_run_config


@torch.inference_mode()
def shift_and_gap(scorer, user: int, vectors: np.ndarray, split: str) -> tuple[np.ndarray, float]:
    """Per text: the mean score over the user's lists that hold a positive; and the user's gap (mean label -
    mean predicted probability, averaged over the texts). NaN for a user with no such list."""
    rows = scorer._lists_of(np.array([user]), split)[0]
    if len(rows) == 0:  # no list with a positive: no reward either
        return np.full(len(vectors), np.nan), np.nan
    model, idx = scorer.model, torch.as_tensor(rows)
    candidates, personal = model.list_context(scorer.lists.items[idx], scorer.lists.history[idx])
    labels = scorer.lists.labels[idx].float()
    shifts, gaps = [], []
    for vector in model.user_tower(torch.as_tensor(vectors)):
        scores = model.rank(model.join(candidates, vector.expand(len(rows), -1)), personal).float()
        shifts.append(scores.mean().item())
        gaps.append((labels.mean() - torch.sigmoid(scores).mean()).item())
    return np.asarray(shifts), float(np.mean(gaps))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="scratch folder (the run is only read)")
    parser.add_argument("--round", type=int, default=0)
    parser.add_argument("--users", type=int, nargs="+", default=[50, 195], help="train users the probe fits on")
    args = parser.parse_args(argv)

    config = load_run_config(args.run)
    here = args.run / f"round_{args.round}"
    scorer, reward_split = reward_scorer(here / "recommender" / reward_model_name(config.recommend, config.align.held_out_share),
                                         args.run, config.align, "cpu")
    emb = read_embeddings(here / "embeddings")
    texts = read_parquet(here / "knowledge" / "knowledge.parquet")[["user_index", "sample", "text"]]
    positive_share = reward_probe.prompt_positive_share(args.run)
    tables = {}
    for split, lists in (("train", reward_split), ("validation", "validation")):
        sampled = np.unique(emb.user_index[(emb.sample > 0) & np.isin(emb.user_index, split_user_indices(args.run, split))])
        table = scorer.score_embeddings(emb, split=lists, users=sampled, reward=REWARDS[0]).drop(columns="reward")
        for kind in REWARDS:
            table[kind] = scorer.score_embeddings(emb, split=lists, users=sampled, reward=kind)["reward"].to_numpy()
        shifts = []
        for user in sampled:
            at = np.flatnonzero(emb.user_index == user)
            shift, gap = shift_and_gap(scorer, user, emb.user_vectors[at], lists)
            shifts.append(pd.DataFrame({"user_index": user, "sample": emb.sample[at], "shift": shift, "gap": gap}))
        table = table.merge(pd.concat(shifts), on=["user_index", "sample"], how="left")
        tables[split] = table = table[(table["sample"] > 0)].dropna(subset=["loglik", "shift"])
        by_user = table.groupby("user_index")
        corr = by_user.apply(lambda f: f["loglik"].corr(f["shift"]))
        centred = table[["loglik", "shift"]] - by_user[["loglik", "shift"]].transform("mean")
        slope = (centred["loglik"] * centred["shift"]).groupby(table["user_index"]).sum() / (centred["shift"] ** 2).groupby(table["user_index"]).sum()
        explained = 1 - ((centred["loglik"] - slope.reindex(table["user_index"]).to_numpy() * centred["shift"]) ** 2).sum() / (centred["loglik"] ** 2).sum()
        gap = by_user["gap"].first()
        same_sign = (np.sign(corr) == np.sign(gap)).mean()
        print(f"{split}: {by_user.ngroups} users; median |corr(loglik, shift)| {corr.abs().median():.3f}; its sign is the "
              f"user's calibration gap's for {same_sign:.0%}; the shift explains {explained:.0%} of loglik's within-user "
              f"variance; users whose lists hold more positives than predicted: {(gap > 0).mean():.0%}; correlation of "
              f"the gap with the share of the prompt's movies rated above the threshold {gap.corr(positive_share.reindex(gap.index)):+.3f}")

    results = {}
    for kind in ("shift", *REWARDS):
        folder = args.out / kind
        for split, name in (("train", "rewards.parquet"), ("validation", "validation_rewards.parquet")):
            frame = tables[split][["user_index", "sample", kind]].rename(columns={kind: "reward"})
            write_parquet(folder / f"round_{args.round}" / "preferences" / name, frame.merge(texts, on=["user_index", "sample"], how="left"))
        link_from_run(args.run, folder, "data", "prompts", "cache", "config.json")  # what the probe reads besides the rewards
        print(f"\nreward probe on {kind}:")
        reward_probe.main([str(folder), "--round", str(args.round), "--users", *map(str, args.users), "--alpha", "1", "10",
                           "--json", str(folder / "probe.json")])
        results[kind] = json.loads((folder / "probe.json").read_text())
    (args.out / "calibration.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
