"""How much can any user text add to the re-ranker, and to a ranking by text alone?

    python experiments/text_headroom.py RUN [--seeds 3]

The recommender's reward can only prefer one text of a user over another for a
reason DPO could learn if the re-ranker gains from what a text says. This
trains the run's re-ranker (its config and data, round 0's item vectors) with
four kinds of user text, each with ``--seeds`` seeds, and reports validation
and test MAP@5:

* ``none``: no knowledge (IDs and history only, the no-knowledge arm);
* ``greedy``: the run's round-0 greedy LLM texts (the KAR arm);
* ``history``: a rule-made summary of the prompt history, the most any reading
  of the prompt can say: the three genres the user rated highest (of those
  seen twice or more), the lowest-rated ones, three top-rated titles, and the
  share of movies rated above the label threshold;
* ``future``: cheating on purpose, a text naming the three most frequent
  genres and six titles of the user's positives in *all* their lists, test
  lists included: an upper bound on what a text can carry.

Then the same texts rank each validation list with no model at all, by the
cosine between the text's vector and each candidate's text vector (what
``align.reward_model = "text_match"`` scores), against a random order.
The run folder is only read.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dpo4rec.artifacts import read_parquet
from dpo4rec.encode import read_embeddings
from dpo4rec.encode.encoder import TextEncoder
from dpo4rec.metrics import rerank_metrics
from dpo4rec.recommend.features import list_tensors, user_knowledge
from dpo4rec.recommend.train import build_recommender, evaluate, train_recommender
from dpo4rec.run import load_run_config


def history_texts(data: Path, threshold: float) -> pd.Series:
    """One summary per user of the prompt history's ratings (what the LLM was shown)."""
    inter = read_parquet(data / "interactions.parquet")
    items = read_parquet(data / "items.parquet").set_index("item_index")
    shown = inter[inter["in_prompt"]].join(items[["title", "genres"]], on="item_index")
    texts = {}
    for user, rows in shown.groupby("user_index"):
        by_genre = rows.assign(genre=rows["genres"].str.split("|")).explode("genre").groupby("genre")["rating"].agg(["mean", "size"])
        by_genre = by_genre[by_genre["size"] >= 2].sort_values(["mean", "size"], ascending=False)
        low = by_genre[by_genre["mean"] <= 3.0].index[-2:].tolist()
        top = rows.sort_values("rating", ascending=False, kind="stable")["title"].head(3).tolist()
        texts[user] = (f"This user loves {', '.join(by_genre.index[:3])} movies."
                       + (f" They dislike {' and '.join(low)} movies." if low else "")
                       + f" Favorite movies: {'; '.join(top)}. They rate {(rows['rating'] > threshold).mean():.0%} of movies highly.")
    return pd.Series(texts)


def future_texts(data: Path) -> pd.Series:
    """Cheating on purpose: genres and titles of the user's positives in every list, test lists included."""
    lists = read_parquet(data / "lists.parquet")
    items = read_parquet(data / "items.parquet").set_index("item_index")
    texts = {}
    for user, rows in lists.groupby("user_index"):
        liked = [i for its, labels in zip(rows["items"], rows["labels"]) for i, label in zip(its, labels) if label > 0]
        genres = items.loc[liked, "genres"].str.split("|").explode().value_counts().index[:3].tolist() if liked else []
        titles = items.loc[liked[-6:], "title"].tolist() if liked else []
        texts[user] = f"This user loves {', '.join(genres)} movies, such as {'; '.join(titles)}."
    return pd.Series(texts)


def cosine_map(lists: pd.DataFrame, item_vectors: np.ndarray, users: dict[int, np.ndarray]) -> float:
    """Validation MAP@5 of ranking each list by cosine(user text, item text) alone."""
    scores = np.stack([item_vectors[np.asarray(items)] @ users[u] for items, u in zip(lists["items"], lists["user_index"])])
    return float(np.nanmean(rerank_metrics(np.stack(lists["labels"].to_numpy()), scores, ks=(5,))["map@5"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    if not (args.run / "round_0" / "embeddings" / "users.safetensors").is_file():
        print(f"{args.run}: no round_0/embeddings/users.safetensors; give a run folder whose round 0 is encoded", file=sys.stderr)
        return 2
    config = load_run_config(args.run)
    data = args.run / "data"
    frames = {name: read_parquet(data / f"{name}.parquet") for name in ("items", "lists", "users")}
    if "genres" not in frames["items"]:
        print(f"{data / 'items.parquet'}: no genres column; the history and future texts need one (ML-1M)", file=sys.stderr)
        return 2
    lists = list_tensors(frames["lists"])
    emb = read_embeddings(args.run / "round_0" / "embeddings", config.recommend.item_knowledge)
    threshold = float(read_parquet(data / "interactions.parquet").query("label > 0")["rating"].min()) - 1e-9
    encoder = TextEncoder(emb.encoder)
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    greedy_users, greedy_vectors = emb.for_sample(0)
    vectors = {"greedy": dict(zip(greedy_users, greedy_vectors))}
    for name, texts in (("history", history_texts(data, threshold)), ("future", future_texts(data))):
        print(f"{name} text, user {texts.index[0]}: {texts.iloc[0]}")
        vectors[name] = dict(zip(texts.index, encoder.encode(texts.tolist(), progress=False)[0]))
    n_users = len(frames["users"])
    results = []
    for arm in ("none", *vectors):
        knowledge = None if arm == "none" else user_knowledge(n_users, np.fromiter(vectors[arm], np.int64), np.stack(list(vectors[arm].values())))
        for seed in range(args.seeds):
            cfg = dataclasses.replace(config.recommend, seed=config.recommend.seed + seed, knowledge=arm != "none")
            torch.manual_seed(cfg.seed)
            model = build_recommender(cfg, frames["items"], lists, emb.dim if knowledge else None,
                                      (emb.item_index, emb.item_vectors) if knowledge else None, emb.encoder)
            train_recommender(model, lists, knowledge, cfg, progress=False)
            row = {"text": arm, "seed": cfg.seed}
            for split in ("validation", "test"):
                row[split] = float(np.mean(evaluate(model, lists.of_split(split), knowledge)["map@5"]))
            results.append(row)
            print(f"  {arm} seed {cfg.seed}: validation MAP@5 {row['validation']:.4f}, test {row['test']:.4f}", flush=True)
    table = pd.DataFrame(results).groupby("text", sort=False)[["validation", "test"]].agg(["mean", "std"])
    print("\n| user text | re-ranker validation MAP@5 (mean +- sd over seeds) | test MAP@5 | text alone: cosine ranking, validation MAP@5 |")
    print("|---|---|---|---|")
    items = np.zeros((int(emb.item_index.max()) + 1, emb.dim), np.float32)
    items[emb.item_index] = unit(emb.item_vectors)
    validation = frames["lists"][frames["lists"]["split"].astype(str) == "validation"]
    for arm, row in table.iterrows():
        alone = "-" if arm == "none" else f"{cosine_map(validation, items, {u: unit(v) for u, v in vectors[arm].items()}):.4f}"
        print(f"| {arm} | {row[('validation', 'mean')]:.4f} +- {row[('validation', 'std')]:.4f} | "
              f"{row[('test', 'mean')]:.4f} +- {row[('test', 'std')]:.4f} | {alone} |")
    rng = np.random.default_rng(0)
    random_scores = rng.random((len(validation), len(validation["items"].iloc[0])))
    random_map = np.nanmean(rerank_metrics(np.stack(validation["labels"].to_numpy()), random_scores, ks=(5,))["map@5"])
    print(f"| random order | - | - | {random_map:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
