"""Is the reward noise because its recommender learned each user's one text as a fingerprint?

    python experiments/augmented_reward.py RUN --out SCRATCH [--round 0] [--probe-rewards loglik listwise ...]

The run's reward recommender trains on one (greedy) text per user. With a
text per user, the knowledge tower can read fine details of that text as an
identity, and a sampled text of the same user then scores by how closely it
matches those details: consistent within the user (split-half reliability)
yet shared by no one (docs/results.md, issue 9 sections 2-3). Here the same
held-out reward recommender is trained twice on the run's lists, with the
same seed: "greedy" (as the run) and "any text" (each time a sampled train
user's list is drawn in training, one of that user's texts, greedy or
sampled, is drawn with it; everyone else keeps the greedy text), so only what
the user's texts share can help it. For each: validation MAP@5 (greedy
texts), split-half reliability of every reward on the validation users'
samples, and the reward probe (experiments/reward_probe.py) on its rewards
(`--probe-rewards`; default the run's `align.reward`). Rewards go to SCRATCH/<variant>/<reward>/round_<t>/preferences/; the run
folder is only read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import reward_probe
from scratch import link_from_run
from dpo4rec.align.reliability import split_half_reliability
from dpo4rec.artifacts import read_parquet, write_parquet
from dpo4rec.config import REWARDS
from dpo4rec.encode import read_embeddings
from dpo4rec.recommend import RewardScorer
from dpo4rec.recommend.features import UserKnowledge, list_tensors, mark_reward_lists, user_knowledge
from dpo4rec.recommend.train import build_recommender, evaluate, train_recommender
from dpo4rec.run import load_run_config


class AnyOfTheirTexts:
    """Stands in for UserKnowledge.vectors: indexing it by user ids gives, for each id, one of that user's texts
    drawn at random (users with one text always get it). The trainer only ever indexes the table by a batch's users."""

    def __init__(self, texts: torch.Tensor, counts: torch.Tensor, seed: int):
        self.texts, self.counts = texts, counts  # (n_users, S, dim), (n_users,)
        self.generator = torch.Generator().manual_seed(seed)
        self.shape = (texts.shape[0], texts.shape[2])

    def __getitem__(self, users: torch.Tensor) -> torch.Tensor:
        draw = (torch.rand(len(users), generator=self.generator) * self.counts[users]).long()
        return self.texts[users, draw]


def any_text_knowledge(greedy: UserKnowledge, emb, users: np.ndarray, seed: int) -> UserKnowledge:
    """``greedy``'s table, where each of ``users`` also has its sampled texts to draw from."""
    n_users, dim = greedy.vectors.shape
    most = 1 + int(emb.sample.max())
    texts = greedy.vectors[:, None, :].repeat(1, most, 1)
    counts = torch.ones(n_users, dtype=torch.long)
    for user in users:
        at = np.flatnonzero(emb.user_index == user)
        texts[user, : len(at)] = torch.from_numpy(np.asarray(emb.user_vectors[at], np.float32))
        counts[user] = len(at)
    return UserKnowledge(AnyOfTheirTexts(texts, counts, seed), greedy.known)


def run_inputs(run: Path, round_index: int = 0, history: bool = True):
    """What a reward recommender of ``run`` trains on: config, data frames, lists (train users' last lists held out
    as split "reward"), the round's embeddings, and the greedy texts' knowledge table. ``history=False``: every
    list's recent history is blanked, so a recommender trained and scored on these lists knows the user only
    through the text."""
    config = load_run_config(run)
    frames = {name: read_parquet(run / "data" / f"{name}.parquet") for name in ("items", "lists", "users")}
    lists = list_tensors(mark_reward_lists(frames["lists"], config.align.held_out_share or 0.25))
    if not history:
        lists = dataclasses.replace(lists, history=torch.zeros_like(lists.history))
    folder = run / f"round_{round_index}" / "embeddings"
    emb = read_embeddings(folder, config.recommend.item_knowledge)
    greedy = user_knowledge(len(frames["users"]), *emb.for_sample(0), str(folder))
    return config, frames, lists, emb, greedy


def sampled_users(frames: dict, emb) -> dict[str, np.ndarray]:
    """Per split (train, validation): the users with sampled texts (sample > 0) in the round's embeddings."""
    split_of = frames["users"].set_index("user_index")["split"].astype(str)
    return {split: np.unique(emb.user_index[(emb.sample > 0) & np.isin(emb.user_index, split_of.index[split_of == split])])
            for split in ("train", "validation")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="scratch folder (the run is only read)")
    parser.add_argument("--round", type=int, default=0)
    parser.add_argument("--users", type=int, nargs="+", default=[50, 195], help="train users the probe fits on")
    parser.add_argument("--probe-rewards", nargs="+", choices=REWARDS, help="rewards to probe (default: the run's align.reward)")
    args = parser.parse_args(argv)

    config, frames, lists, emb, greedy = run_inputs(args.run, args.round)
    probed = args.probe_rewards or [config.align.reward]
    here = args.run / f"round_{args.round}"
    sampled = sampled_users(frames, emb)
    texts = read_parquet(here / "knowledge" / "knowledge.parquet")[["user_index", "sample", "text"]]
    variants = {"greedy": greedy, "any_text": any_text_knowledge(greedy, emb, sampled["train"], config.recommend.seed)}

    summary, rewards = {}, {}
    for name, knowledge in variants.items():
        model = build_recommender(config.recommend, frames["items"], lists, emb.dim, (emb.item_index, emb.item_vectors), emb.encoder)
        result = train_recommender(model, lists, knowledge, config.recommend)
        validation = float(np.mean(evaluate(model, lists.of_split("validation"), greedy)["map@5"]))
        scorer = RewardScorer(model, lists)
        reliability = {kind: split_half_reliability(scorer, emb, sampled["validation"], kind, config.data.seed) for kind in REWARDS}
        summary[name] = {"validation_map@5": validation, "best_epoch": result.best_epoch, "seconds": result.seconds,
                         "reliability": reliability}
        print(f"\n{name}: validation MAP@5 {validation:.4f} (greedy texts), epoch {result.best_epoch}, {result.seconds:.0f} s")
        print("| reward | pair agreement across halves [95% CI] (pairs) | best-worst agreement [95% CI] |\n|---|---|---|")
        for kind, r in reliability.items():
            fmt = lambda key: f"{r[key]:.3f} [{r[key + '_ci95'][0]:.3f}, {r[key + '_ci95'][1]:.3f}]" if key in r else "-"  # noqa: E731
            print(f"| {kind} | {fmt('pair_agreement')} ({r.get('pair_agreement_pairs', 0)}) | {fmt('best_worst_agreement')} |")
        for kind in probed:
            folder = args.out / name / kind
            for split, list_split, file in (("train", "reward", "rewards.parquet"), ("validation", "validation", "validation_rewards.parquet")):
                table = scorer.score_embeddings(emb, split=list_split, users=sampled[split], reward=kind)
                rewards[name, kind, split] = table.set_index(["user_index", "sample"])["reward"]
                write_parquet(folder / f"round_{args.round}" / "preferences" / file, table.merge(texts, on=["user_index", "sample"], how="left"))
            link_from_run(args.run, folder, "data", "prompts", "cache", "config.json")  # what the probe reads besides the rewards

    for kind in probed:
        for split in ("train", "validation"):
            joined = pd.concat({name: rewards[name, kind, split] for name in variants}, axis=1)
            joined = joined[joined.index.get_level_values("sample") > 0]
            centred = joined - joined.groupby(level=0).transform("mean")
            corr = float(centred["greedy"].corr(centred["any_text"]))
            summary[f"within_user_correlation_{kind}_{split}"] = corr
            print(f"{split}: within-user correlation of the two recommenders' {kind} rewards {corr:+.3f}")
    for name in variants:
        for kind in probed:
            folder = args.out / name / kind
            print(f"\nreward probe on {name}'s {kind} rewards:")
            reward_probe.main([str(folder), "--round", str(args.round), "--users", *map(str, args.users),
                               "--alpha", "1", "10", "--json", str(folder / "probe.json")])
            summary[name][f"probe_{kind}"] = json.loads((folder / "probe.json").read_text())
    (args.out / "augmented_reward.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
