"""Did DPO raise the reward it was trained on? Every round's texts under round 0's reward model.

Round 0's reward recommender stays fixed; each round's texts of the train
users (greedy and sampled) are scored by it as in round 0's reward stage.
If DPO works as an optimizer, round 1's texts should score higher than round
0's under that model, whatever the test metrics then say. The difference is
paired over train users (a user's mean over samples), with a bootstrap
interval. Train users only: this is a diagnostic of the training signal,
never used to select anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dpo4rec.artifacts import read_parquet, round_dir
from dpo4rec.config import PipelineConfig
from dpo4rec.stats import paired_bootstrap


def reward_drift(run_dir: Path, config: PipelineConfig) -> list[dict]:
    """Per round: mean reward of greedy and sampled texts under round 0's reward model, and the change since round 0."""
    from dpo4rec.reward.stage import reward_folders, round_reward_scorer, train_user_indices
    from dpo4rec.encode import read_embeddings

    if not all((r / "model.safetensors").is_file() for r in reward_folders(run_dir, 0, config.recommend, config.align)):
        return []
    embeddings = {t: read_embeddings(round_dir(run_dir, t) / "encode") for t in range(config.run.rounds + 1)
                  if (round_dir(run_dir, t) / "encode" / "users.safetensors").is_file()}
    if 0 not in embeddings:
        return []
    scorer, split = round_reward_scorer(run_dir, 0, config.recommend, config.align)
    first = embeddings[0]  # the train users whose samples fed DPO
    train_users = np.intersect1d(train_user_indices(run_dir), first.user_index[first.sample > 0])
    per_round = {t: scorer.score_embeddings(e, split=split, users=train_users, reward=config.align.reward) for t, e in embeddings.items()}
    base = per_round[0][per_round[0]["sample"] > 0].groupby("user_index")["reward"].mean()
    rows = []
    for t, table in per_round.items():
        sampled = table[table["sample"] > 0].groupby("user_index")["reward"].mean().dropna()
        row = {"round": t, "greedy": float(table.loc[table["sample"] == 0, "reward"].mean()), "users": int(len(sampled))}
        if len(sampled):  # the last round samples no train users
            row["sampled"] = float(sampled.mean())
        common = base.index.intersection(sampled.index)
        if t > 0 and len(common):
            diff, ci = paired_bootstrap(np.asarray(common), sampled[common].to_numpy(), base[common].to_numpy(), seed=config.data.seed)
            row.update({"sampled_minus_round_0": diff, "ci95": list(ci)})
        rows.append(row)
    return rows


def validation_drift(run_dir: Path, config: PipelineConfig) -> list[dict]:
    """Per DPO round t: round t+1's sampled validation texts minus round t's, both under round t's reward model.

    Validation users never feed DPO or the recommenders' training, so a rise
    here is what DPO learned carrying to unseen users. Per user, the mean
    reward over their samples; paired over users sampled in both rounds.
    """
    rows = []
    for t in range(config.run.rounds):
        both = validation_rewards(run_dir, config, t)
        row = sampled_drift(*both, config.data.seed) if both else {}
        if row:
            rows.append({"round": t, **row, "reward": config.align.reward})
    return rows


def validation_rewards(run_dir: Path, config: PipelineConfig, t: int) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """Round t's and round t+1's validation texts, both under round t's reward model (user_index, sample, reward);
    None when round t has no validation rewards or round t+1 no embeddings."""
    from dpo4rec.reward.stage import round_reward_scorer
    from dpo4rec.encode import read_embeddings

    before_file = round_dir(run_dir, t) / "reward" / "validation_rewards.parquet"
    after_folder = round_dir(run_dir, t + 1) / "encode"
    if not before_file.is_file() or not (after_folder / "users.safetensors").is_file():
        return None
    before = read_parquet(before_file)
    scorer, _ = round_reward_scorer(run_dir, t, config.recommend, config.align)
    after = scorer.score_embeddings(read_embeddings(after_folder), split="validation", users=before["user_index"].unique(),
                                    reward=config.align.reward)
    return before, after


def sampled_drift(before: pd.DataFrame, after: pd.DataFrame, seed: int = 0) -> dict:
    """Mean over users of (mean reward of the user's sampled texts after - before), with a paired bootstrap interval.

    ``before``/``after``: user_index, sample, reward (sample 0, the greedy text, and NaN rewards left out);
    users sampled on one side only are left out. Empty dict when no user is on both sides.
    """
    mean_before = before[before["sample"] > 0].groupby("user_index")["reward"].mean().dropna()
    mean_after = after[after["sample"] > 0].groupby("user_index")["reward"].mean().dropna()
    common = mean_before.index.intersection(mean_after.index)
    if len(common) == 0:
        return {}
    diff, ci = paired_bootstrap(np.asarray(common), mean_after[common].to_numpy(), mean_before[common].to_numpy(), seed=seed)
    return {"users": int(len(common)), "before": float(mean_before[common].mean()), "after": float(mean_after[common].mean()),
            "validation_reward_drift": diff, "validation_reward_drift_ci95": list(ci)}
