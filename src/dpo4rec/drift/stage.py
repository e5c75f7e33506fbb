"""The drift stage (round t >= 1): round t's texts under the reward models of earlier rounds.

* Validation drift of DPO round t-1: round t's sampled validation texts minus
  round t-1's, both under round t-1's reward model. Validation users never
  feed DPO or the recommenders' training, so a rise here is what DPO learned
  carrying to unseen users. Per user, the mean reward over their samples;
  paired over users sampled in both rounds, with a bootstrap interval.
* Reward drift (train users): round t's texts, greedy and sampled, under
  round 0's reward model, against round 0's own. If DPO works as an
  optimizer, later rounds score higher under that model, whatever the test
  metrics then say. A diagnostic of the training signal, never used to
  select anything.

Writes ``RUN/round_<t>/drift/summary.json`` (``validation``, ``train``: the
rows the report shows) and ``manifest.json``; the report reads them and
scores nothing itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dpo4rec.artifacts import StageFolder, StageResult, begin_stage, fingerprint_file, read_parquet, round_dir, write_json
from dpo4rec.config import PipelineConfig, to_dict
from dpo4rec.errors import InputError
from dpo4rec.stats import paired_bootstrap

STAGE = "drift"


def run_drift_stage(run_dir: str | Path, round_index: int, config: PipelineConfig) -> StageResult:
    """Round ``round_index``'s texts under round ``round_index - 1``'s and round 0's reward models, or reuse them."""
    run_dir = Path(run_dir)
    if round_index < 1:
        raise InputError(f"the drift stage compares a round with earlier ones: --round must be >= 1, got {round_index}")
    needed = {  # key: the stage that writes it (said when it is missing)
        "encode": round_dir(run_dir, round_index) / "encode" / "users.safetensors",
        "reward": round_dir(run_dir, round_index - 1) / "reward" / "validation_rewards.parquet",
        "reward of round 0": round_dir(run_dir, 0) / "reward" / "rewards.parquet",
    }
    for stage, path in needed.items():
        if not path.is_file():
            raise InputError(f"{path} not found; run the {stage.split()[0]} stage for round {path.parts[-3].removeprefix('round_')} first")
    folder = round_dir(run_dir, round_index) / STAGE
    settings = {"reward": to_dict(config.align), "recommend": to_dict(config.recommend), "seed": config.data.seed}
    manifest, done = begin_stage(folder, STAGE, settings, {name: fingerprint_file(path) for name, path in needed.items()})
    if done:
        return done
    summary = {"round": round_index, "validation": None, "train": reward_drift(run_dir, config, round_index)}
    both = validation_rewards(run_dir, config, round_index - 1)
    if both is not None:
        row = sampled_drift(*both, config.data.seed)
        summary["validation"] = {"round": round_index - 1, **row, "reward": config.align.reward} if row else None
    with StageFolder(folder, manifest) as tmp:
        write_json(tmp / "summary.json", summary)
    return StageResult(folder, summary, False)


def reward_drift(run_dir: Path, config: PipelineConfig, round_index: int) -> list[dict]:
    """Round 0's and round ``round_index``'s texts of the train users whose samples fed DPO, under round 0's reward
    model: mean reward of greedy and sampled texts, and round t's sampled minus round 0's, paired over users.
    Round 0's are the rewards its reward stage wrote (the same scorer, lists and users), not scored again."""
    from dpo4rec.encode import read_embeddings
    from dpo4rec.reward.stage import round_reward_scorer

    base_rewards = read_parquet(round_dir(run_dir, 0) / "reward" / "rewards.parquet")[["user_index", "sample", "reward"]]
    train_users = base_rewards["user_index"].unique()  # the sampled train users, whose pairs fed DPO
    scorer, split = round_reward_scorer(run_dir, 0, config.recommend, config.align)
    later = read_embeddings(round_dir(run_dir, round_index) / "encode")
    per_round = {0: base_rewards,
                 round_index: scorer.score_embeddings(later, split=split, users=train_users, reward=config.align.reward)}
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
