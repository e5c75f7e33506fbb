"""A reward whose preference can be learned: does the text name the genres of the movies the user goes on to like?

The run's reward comes from the recommender, and at SmolLM2-135M scale what
it prefers between two of a user's texts is not shared across users
(docs/results.md, issue 9). As a positive control for the DPO machinery and
the held-out check, this reward is a transparent rule on the same lists: for
each ML-1M genre, its lift for the user (the share of the user's positives in
that genre minus the share of all the list's candidates in it, over the
user's reward lists that hold a positive), and a text's reward is the sum of
the lifts of the genres it names. Naming a genre the user likes more than the
candidates do earns reward, naming one they avoid costs it; a text naming no
genre gets 0. What it prefers is readable from the prompt (the titles and
stars the user gave) and shared across users (name what this user rates well),
which is what the recommender's reward lacks here.

    python experiments/genre_reward.py RUN     # how learnable it is on RUN's round-0 samples (seconds)

prints its split-half reliability on the validation users (as
align/reliability.py measures the run's reward) and the pair accuracy on
validation users of a ridge probe on the genres-named indicators fitted on
the first 50 and all sampled train users (as experiments/reward_probe.py).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

# ML-1M's 18 genres and the words a text may use for each (matched at word starts, case-insensitive)
GENRE_WORDS = {
    "Action": r"action", "Adventure": r"adventur", "Animation": r"animat|cartoon", "Children's": r"child|kids?\b",
    "Comedy": r"comed|comic|funny|humou?r", "Crime": r"crime|criminal|gangster", "Documentary": r"documentar",
    "Drama": r"drama", "Fantasy": r"fantas", "Film-Noir": r"noir", "Horror": r"horror|scary", "Musical": r"musical",
    "Mystery": r"myster", "Romance": r"romance|romantic|love stor", "Sci-Fi": r"sci-?fi|science.fiction",
    "Thriller": r"thrill|suspense", "War": r"war\b", "Western": r"western",
}
GENRES = list(GENRE_WORDS)
_PATTERNS = [re.compile(r"\b(?:" + words + ")", re.IGNORECASE) for words in GENRE_WORDS.values()]


def mentions(texts) -> np.ndarray:
    """(texts, genres) 0/1: which genres each text names."""
    return np.array([[bool(p.search(text)) for p in _PATTERNS] for text in texts], dtype=np.float64).reshape(-1, len(GENRES))


def item_genres(items: pd.DataFrame) -> np.ndarray:
    """(max item_index + 1, genres) 0/1 from items.parquet's "A|B" genres column."""
    if "genres" not in items:
        raise SystemExit("the genre reward needs a 'genres' column in items.parquet (ML-1M)")
    table = np.zeros((int(items["item_index"].max()) + 1, len(GENRES)))
    for index, genres in zip(items["item_index"], items["genres"].fillna("")):
        for genre in str(genres).split("|"):
            if genre in GENRE_WORDS:
                table[index, GENRES.index(genre)] = 1
    return table


def genre_lift(lists: pd.DataFrame, genres: np.ndarray) -> pd.DataFrame:
    """Per user (index) and genre (columns): share of the user's positives in the genre minus the share of all the
    candidates in it, over the given lists that hold a positive."""
    lists = lists[[max(labels) > 0 for labels in lists["labels"]]]
    rows = []
    for user, frame in lists.groupby("user_index"):
        items = np.concatenate(frame["items"].to_numpy())
        labels = np.concatenate(frame["labels"].to_numpy()).astype(bool)
        rows.append(pd.Series(genres[items[labels]].mean(0) - genres[items].mean(0), index=GENRES, name=user))
    return pd.DataFrame(rows)


def genre_rewards(knowledge: pd.DataFrame, lift: pd.DataFrame) -> pd.DataFrame:
    """user_index, sample, reward for the texts of the users in ``lift`` (others left out)."""
    texts = knowledge[knowledge["user_index"].isin(lift.index)].reset_index(drop=True)
    reward = (mentions(texts["text"]) * lift.loc[texts["user_index"]].to_numpy()).sum(1)
    return pd.DataFrame({"user_index": texts["user_index"], "sample": texts["sample"], "reward": reward})


def reward_lists(run: Path, align, users) -> dict[str, pd.DataFrame]:
    """The lists of ``users`` each split's reward reads: train users' reward lists (their held-out last share, or
    all their train lists, as ``align.reward_lists`` says) and validation users' validation lists."""
    from dpo4rec.recommend.features import mark_reward_lists

    lists = pd.read_parquet(run / "data" / "lists.parquet")
    train = lists if align.reward_lists == "train" else mark_reward_lists(lists, align.reward_holdout)
    train_split = "train" if align.reward_lists == "train" else "reward"
    return {"train": train[(train["split"] == train_split) & train["user_index"].isin(users)],
            "validation": lists[(lists["split"] == "validation") & lists["user_index"].isin(users)]}


def lifts(run: Path, align, knowledge: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per split (train, validation): each sampled user's genre lift on the lists their reward reads."""
    genres = item_genres(pd.read_parquet(run / "data" / "items.parquet"))
    sampled = knowledge.loc[knowledge["sample"] > 0, "user_index"].unique()
    return {split: genre_lift(lists, genres) for split, lists in reward_lists(run, align, sampled).items()}


def main(argv=None) -> int:
    import reward_probe
    from dpo4rec.align.reliability import agreement
    from dpo4rec.config import AlignConfig

    run = Path((argv or sys.argv[1:])[0])
    align = AlignConfig(**json.loads((run / "config.json").read_text())["align"])
    knowledge = pd.read_parquet(run / "round_0" / "knowledge" / "knowledge.parquet")
    sampled = knowledge[knowledge["sample"] > 0]
    genres = item_genres(pd.read_parquet(run / "data" / "items.parquet"))
    validation_lists = reward_lists(run, align, sampled["user_index"].unique())["validation"]
    half = validation_lists.groupby("user_index").cumcount() % 2
    a, b = (genre_rewards(sampled, genre_lift(validation_lists[half == h], genres)) for h in (0, 1))
    split_half = agreement(a, b)
    print(f"split-half reliability, validation users: {split_half['pair_agreement']:.3f} "
          f"[{split_half['pair_agreement_ci95'][0]:.3f}, {split_half['pair_agreement_ci95'][1]:.3f}]")
    lift = lifts(run, align, knowledge)
    print("mean lift over train users:", lift["train"].mean().round(3).to_dict())
    rewards = {split: genre_rewards(sampled, table) for split, table in lift.items()}
    text_of = sampled.set_index(["user_index", "sample"])["text"]
    features = {}
    for split, table in rewards.items():
        named = mentions(text_of.loc[list(zip(table["user_index"], table["sample"]))])
        features[split] = reward_probe.centred(table, named)
    x, y, users = features["train"]
    xv, _, uv = features["validation"]
    for n in (50, len(np.unique(users))):
        keep = np.isin(users, np.unique(users)[:n])
        weights = reward_probe.ridge(x[keep], y[keep], 1.0)
        hits = reward_probe.pair_hits(xv @ weights, rewards["validation"]["reward"].to_numpy(), uv)
        print(f"probe on genres named, {n} train users: validation pair accuracy %.3f [%.3f, %.3f]" % reward_probe.accuracy_ci(hits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
