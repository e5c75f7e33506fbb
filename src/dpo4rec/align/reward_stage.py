"""The reward stage: score every sampled text of the train users, keep best vs worst.

Reads round t's ``embeddings/`` (one vector per (user, sample)), the reward
recommender, ``knowledge/`` and ``prompts/``; writes ``RUN/round_<t>/preferences/``:

* ``rewards.parquet``: user_index, sample, reward (mean NDCG@5 over the
  user's reward lists with that text's vector plugged in), text;
* ``pairs.parquet``: user_index, prompt, chosen, rejected, reward_chosen,
  reward_rejected, sample_chosen, sample_rejected;
* ``summary.json`` (reward spread, pair count) and ``manifest.json``.

Only train users are scored: validation and test users never feed rewards.

Reward lists (``align.reward_lists``): "held_out" (default) scores each train
user's last ``reward_holdout`` share of lists with ``<backbone>-reward-holdout``,
a recommender trained without them; "train" scores all train lists with the
round's recommender, which trained on those very lists and may reward texts
that merely help it recall them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dpo4rec.align.pairs import make_pairs, reward_spread
from dpo4rec.artifacts import StageFolder, existing_output, fingerprint_file, make_manifest, read_json, round_dir, write_json, write_parquet
from dpo4rec.config import AlignConfig, RecommendConfig
from dpo4rec.errors import InputError

STAGE = "preferences"


def run_reward_stage(run_dir: str | Path, round_index: int, recommend: RecommendConfig, align: AlignConfig) -> tuple[Path, dict, bool]:
    """Rewards and preference pairs for round ``round_index``; returns (folder, summary, reused)."""
    from dpo4rec.encode import read_embeddings
    from dpo4rec.recommend import model_name

    run_dir = Path(run_dir)
    here = round_dir(run_dir, round_index)
    if not recommend.knowledge:
        raise InputError("the reward needs the knowledge-augmented recommender (recommend.knowledge = true)")
    recommender = here / "recommender" / model_name(recommend, align.held_out_share)
    needed = {
        "embeddings": here / "embeddings" / "users.safetensors",
        "recommender": recommender / "model.safetensors",
        "knowledge": here / "knowledge" / "knowledge.parquet",
        "prompts": run_dir / "prompts" / "prompts.parquet",
    }
    for stage, path in needed.items():
        if not path.is_file():
            raise InputError(f"{path} not found; run the {stage} stage for round {round_index} first")
    settings = {"min_reward_gap": align.min_reward_gap, "recommender": recommender.name,
                "reward_lists": align.reward_lists, "reward_holdout": align.held_out_share}
    manifest = make_manifest(STAGE, settings,
                             {name: fingerprint_file(path) for name, path in needed.items()})
    folder = here / STAGE
    if existing_output(folder, manifest):
        return folder, read_json(folder / "summary.json"), True

    train_users = train_user_indices(run_dir)
    embeddings = read_embeddings(here / "embeddings")
    sampled = embeddings.sample > 0
    if not np.isin(embeddings.user_index[sampled], train_users).any():
        raise InputError(f"{here / 'knowledge'}: no sampled texts for train users; generate with n_samples >= 2")
    scorer, split = reward_scorer(recommender, run_dir, align)
    rewards = scorer.score_embeddings(embeddings, split=split, users=train_users)
    knowledge = pd.read_parquet(needed["knowledge"])
    prompts = pd.read_parquet(needed["prompts"])
    pairs = make_pairs(rewards, knowledge, prompts, align.min_reward_gap)
    rewards = rewards.merge(knowledge[["user_index", "sample", "text"]], on=["user_index", "sample"], how="left")
    summary = {"spread": reward_spread(rewards), "pairs": len(pairs), "train_users": int(len(train_users)),
               "reward_lists": align.reward_lists, "recommender": recommender.name,
               "greedy_reward_mean": float(rewards.loc[rewards["sample"] == 0, "reward"].mean())}
    with StageFolder(folder, manifest) as tmp:
        write_parquet(tmp / "rewards.parquet", rewards)
        write_parquet(tmp / "pairs.parquet", pairs)
        write_json(tmp / "summary.json", summary)
    return folder, summary, False


def reward_scorer(recommender: Path, run_dir: Path, align: AlignConfig):
    """The reward recommender's scorer, and the split of lists its rewards average over."""
    from dpo4rec.recommend import RewardScorer

    scorer = RewardScorer.from_folders(recommender, run_dir / "data", reward_holdout=align.held_out_share)
    return scorer, "reward" if align.held_out_share else "train"


def train_user_indices(run_dir: Path) -> np.ndarray:
    users = pd.read_parquet(run_dir / "data" / "users.parquet")
    return users.loc[users["split"].astype(str) == "train", "user_index"].to_numpy()
