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

from dpo4rec.artifacts import round_dir
from dpo4rec.config import PipelineConfig
from dpo4rec.report.bootstrap import paired_bootstrap


def reward_drift(run_dir: Path, config: PipelineConfig) -> list[dict]:
    """Per round: mean reward of greedy and sampled texts under round 0's reward model, and the change since round 0."""
    from dpo4rec.align.reward_stage import reward_scorer, train_user_indices
    from dpo4rec.encode import read_embeddings
    from dpo4rec.recommend import model_name

    recommender = round_dir(run_dir, 0) / "recommender" / model_name(config.recommend, config.align.held_out_share)
    if not (recommender / "model.safetensors").is_file():
        return []
    scorer, split = reward_scorer(recommender, run_dir, config.align)
    train_users = train_user_indices(run_dir)
    per_round = {}
    for t in range(config.run.rounds + 1):
        folder = round_dir(run_dir, t) / "embeddings"
        if (folder / "users.safetensors").is_file():
            per_round[t] = scorer.score_embeddings(read_embeddings(folder), split=split, users=train_users)
    if 0 not in per_round:
        return []
    base = per_round[0][per_round[0]["sample"] > 0].groupby("user_index")["reward"].mean()
    rows = []
    for t, table in per_round.items():
        sampled = table[table["sample"] > 0].groupby("user_index")["reward"].mean()
        row = {"round": t, "greedy": float(table.loc[table["sample"] == 0, "reward"].mean()),
               "sampled": float(sampled.mean()), "users": int(len(sampled))}
        common = base.index.intersection(sampled.index)
        if t > 0 and len(common):
            diff, ci = paired_bootstrap(np.asarray(common), sampled[common].to_numpy(), base[common].to_numpy(), seed=config.data.seed)
            row.update({"sampled_minus_round_0": diff, "ci95": list(ci)})
        rows.append(row)
    return rows
