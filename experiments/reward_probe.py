"""Can anything learn, from train users' texts, which of an unseen user's texts the reward prefers?

    python experiments/reward_probe.py RUN [--round 0] [--users 25 50 100 200] [--encoder NAME]

DPO can only carry to validation users what is shared across users in the
reward's preferences. This measures how much of that there is, with a learner
far simpler than an LLM: a ridge regression from the text's sentence embedding
(the encoder the recommender reads) and its length to the reward, both centred
within each user (so only which of a user's texts is better counts), fitted on
the sampled train users' texts and applied to the validation users' pairs
(every two samples of a user whose rewards differ, as the held-out check
uses). One view conditions on the user: the embedding times the share of
the prompt's movies the user rated above the label threshold (a rule such as
"write this kind of text for generous raters, that kind for harsh ones").
Pair accuracy: how often the probe orders a pair as the reward does
(chance 0.5), with a 95% bootstrap interval over validation users, for several
numbers of train users (to see whether more users would help). The same
embedding also gives the reward a ceiling: the split-half agreement of the
reward itself is in experiments/reward_reliability.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from dpo4rec.align.probe import centred, ridge
from dpo4rec.config import PipelineConfig, from_dict
from dpo4rec.encode.cache import EmbeddingCache, cache_key
from dpo4rec.encode.encoder import TextEncoder
from dpo4rec.encode.stage import encode_cached


def centred_table(table: pd.DataFrame, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features and rewards minus each user's mean; also the user of each row."""
    users = table["user_index"].to_numpy()
    return centred(features, users), centred(table["reward"].to_numpy(dtype=float), users), users


def prompt_positive_share(run: Path) -> pd.Series:
    """Per user_index: the share of the prompt's items the user rated above the label threshold."""
    interactions = pd.read_parquet(run / "data" / "interactions.parquet", columns=["user_index", "label", "in_prompt"])
    return interactions[interactions["in_prompt"].astype(bool)].groupby("user_index")["label"].mean()


def pair_hits(scores: np.ndarray, reward: np.ndarray, users: np.ndarray) -> dict[int, list[bool]]:
    """Per user: for every two texts with different rewards, does the score order them like the reward?"""
    hits: dict[int, list[bool]] = {}
    for user in np.unique(users):
        rows = np.flatnonzero(users == user)
        for a in range(len(rows)):
            for b in range(a + 1, len(rows)):
                i, j = rows[a], rows[b]
                if reward[i] != reward[j]:
                    hits.setdefault(int(user), []).append((scores[i] - scores[j]) * (reward[i] - reward[j]) > 0)
    return hits


def accuracy_ci(hits: dict[int, list[bool]], seed: int = 0, n_boot: int = 2000) -> tuple[float, float, float]:
    users = list(hits)
    right = np.array([sum(hits[u]) for u in users], dtype=float)
    total = np.array([len(hits[u]) for u in users], dtype=float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(users), size=(n_boot, len(users)))
    boot = right[draws].sum(1) / total[draws].sum(1)
    return right.sum() / total.sum(), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--round", type=int, default=0)
    parser.add_argument("--users", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument("--alpha", type=float, nargs="+", default=[1.0, 10.0, 100.0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--encoder", help="the encoder, when not the run's encode.encoder (a GPU run's folder read here)")
    args = parser.parse_args(argv)

    config = from_dict(PipelineConfig, json.loads((args.run / "config.json").read_text()), "config.json")
    if args.encoder:
        config.encode.encoder = args.encoder
    folder = args.run / f"round_{args.round}" / "preferences"
    tables = {}
    for split, name in (("train", "rewards.parquet"), ("validation", "validation_rewards.parquet")):
        table = pd.read_parquet(folder / name)
        tables[split] = table[table["sample"] > 0].dropna(subset=["reward"]).reset_index(drop=True)
    encoder = TextEncoder(config.encode.encoder, batch_size=config.encode.batch_size, long_texts=config.encode.long_texts)
    cache = EmbeddingCache(args.run / "cache" / "embeddings" / cache_key(encoder.name, config.encode.long_texts), encoder.dim, encoder.name)
    prompts = pd.read_parquet(args.run / "prompts" / "prompts.parquet").set_index("user_index")["message"]
    positive_share = prompt_positive_share(args.run)
    positive_share = (positive_share - positive_share.mean()) / max(positive_share.std(), 1e-9)  # standardized over users
    data = {}
    for split, table in tables.items():
        texts = np.asarray(encode_cached(encoder, cache, table["text"].tolist(), progress=False)[0], dtype=float)
        asked = np.asarray(encode_cached(encoder, cache, prompts.loc[table["user_index"]].tolist(), progress=False)[0], dtype=float)
        length = table["text"].str.len().to_numpy(dtype=float)[:, None] / 300.0
        # three views of a text: what it says (embedding, length), how it agrees with what the
        # LLM was shown (elementwise product with the prompt's embedding: a user-conditional
        # direction), and one number needing no fit: cosine similarity to the prompt
        similarity = (texts * asked).sum(1) / (np.linalg.norm(texts, axis=1) * np.linalg.norm(asked, axis=1))
        generous = positive_share.reindex(table["user_index"]).to_numpy()[:, None]
        data[split] = {
            "embedding + length": centred_table(table, np.hstack([texts, length])),
            "embedding x prompt embedding": centred_table(table, texts * asked),
            # a rule keyed on one thing the prompt shows and the recommender's ids do not: how generously the user rates
            "embedding + length, and x prompt's positive share": centred_table(table, np.hstack([texts, length, (texts * generous), length * generous])),
            "similarity to the prompt (no fit)": centred_table(table, similarity[:, None]),
        }

    rows = []
    print("| features | train users | ridge alpha | train pair accuracy | validation pair accuracy [95% CI] | validation pairs |")
    print("|---|---|---|---|---|---|")
    for view in data["train"]:
        train_x, train_y, train_users = data["train"][view]
        val_x, val_y, val_users = data["validation"][view]
        order = np.random.default_rng(0).permutation(np.unique(train_users))
        no_fit = train_x.shape[1] == 1
        for n_users in [len(order)] if no_fit else args.users:
            chosen = np.isin(train_users, order[:n_users])
            for alpha in [None] if no_fit else args.alpha:
                weights = np.ones(1) if no_fit else ridge(train_x[chosen], train_y[chosen], alpha)
                fit, _, _ = accuracy_ci(pair_hits(train_x[chosen] @ weights, train_y[chosen], train_users[chosen]))
                hits = pair_hits(val_x @ weights, val_y, val_users)
                acc, lo, hi = accuracy_ci(hits)
                n_pairs = sum(len(h) for h in hits.values())
                rows.append({"features": view, "train_users": int(min(n_users, len(order))), "alpha": alpha,
                             "train_pair_accuracy": fit, "validation_pair_accuracy": acc,
                             "validation_pair_accuracy_ci95": [lo, hi], "validation_pairs": n_pairs})
                print(f"| {view} | {rows[-1]['train_users']} | {'-' if alpha is None else f'{alpha:g}'} | {fit:.3f} | "
                      f"{acc:.3f} [{lo:.3f}, {hi:.3f}] | {n_pairs} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
