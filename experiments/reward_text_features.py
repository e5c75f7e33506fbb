"""Is there a direction shared across users in what the reward prefers? Length and word effects, train vs validation.

    python experiments/reward_text_features.py RUN [--round 0]

Rewards of each user's sampled texts are standardized within the user (so
only which of the user's texts is better counts). Then: the correlation of
that with the text's length (also standardized within the user), and, for
every word present in 5-95% of the texts (and in at least 40), the mean
standardized reward of texts with the word minus those without it. If the
reward had a direction that DPO could learn from some users and apply to
others, the word effects measured on train users would agree with those on
validation users.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def standardized(rewards: pd.DataFrame) -> pd.DataFrame:
    table = rewards[rewards["sample"] > 0].dropna(subset=["reward"]).copy()
    within = table.groupby("user_index")
    table["z"] = (table["reward"] - within["reward"].transform("mean")) / (within["reward"].transform("std") + 1e-12)
    length = table["text"].str.len()
    table["length_z"] = (length - length.groupby(table["user_index"]).transform("mean")) / (length.groupby(table["user_index"]).transform("std") + 1e-12)
    table["words"] = table["text"].str.lower().str.findall(r"[a-z]+").apply(set)
    return table


def word_effects(table: pd.DataFrame) -> pd.Series:
    counts = pd.Series([w for words in table["words"] for w in words]).value_counts()
    effects = {}
    for word in counts[counts >= 40].index:
        has = table["words"].apply(lambda words, w=word: w in words).to_numpy()
        if 0.05 <= has.mean() <= 0.95:
            effects[word] = table["z"][has].mean() - table["z"][~has].mean()
    return pd.Series(effects)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--round", type=int, default=0)
    args = parser.parse_args(argv)
    folder = args.run / f"round_{args.round}" / "preferences"
    effects = {}
    for split, name in (("train", "rewards.parquet"), ("validation", "validation_rewards.parquet")):
        table = standardized(pd.read_parquet(folder / name))
        effects[split] = word_effects(table)
        print(f"{split}: {table['user_index'].nunique()} users, {len(table)} texts; "
              f"corr(reward, length) within users {np.corrcoef(table['z'], table['length_z'])[0, 1]:+.3f}")
    both = pd.concat(effects, axis=1, join="inner")
    print(f"word effects, train vs validation: correlation {np.corrcoef(both['train'], both['validation'])[0, 1]:+.3f} over {len(both)} words")
    return 0


if __name__ == "__main__":
    sys.exit(main())
