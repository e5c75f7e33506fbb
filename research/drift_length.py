"""Is what DPO carried to unseen users only length? The report's held-out checks split by text length.

    python research/drift_length.py RUN [--round 0]

Length is the first thing DPO exploits, and a reward that happens to prefer
shorter texts would make both checks of the report clear by length alone.
On the validation users (never in DPO or the recommenders' training), for
round t's DPO:

* validation drift (round t+1's sampled texts minus round t's, under round
  t's reward model, as in the report), then the same among texts that ran
  to the token limit (equal length) in both rounds;
* within users, reward regressed on a text's token count and its round: the
  round's coefficient is the drift that length does not explain;
* held-out pair accuracy over pairs of two texts of equal length, and over
  pairs whose chosen text is the shorter or the longer.
Intervals: 95% bootstrap over validation users.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from dpo4rec.heldout.stage import accuracy_ci, pair_correct
from dpo4rec.artifacts import read_parquet, round_dir
from dpo4rec.errors import InputError
from dpo4rec.drift.stage import sampled_drift, validation_rewards
from dpo4rec.run_config import load_run_config


def with_length(rewards: pd.DataFrame, knowledge: pd.DataFrame) -> pd.DataFrame:
    """Sampled texts only (sample > 0), with their token count and whether they ran to the limit."""
    table = rewards[rewards["sample"] > 0].merge(knowledge[["user_index", "sample", "n_tokens", "finish_reason"]],
                                                 on=["user_index", "sample"])
    return table.assign(at_limit=table["finish_reason"] == "length").dropna(subset=["reward"])


def round_effect(before: pd.DataFrame, after: pd.DataFrame) -> tuple[float, float]:
    """Within-user least squares of reward on (tokens, round): the per-token and the round coefficients."""
    both = pd.concat([before.assign(after=0.0), after.assign(after=1.0)])
    centered = both[["reward", "n_tokens", "after"]] - both.groupby("user_index")[["reward", "n_tokens", "after"]].transform("mean")
    coef = np.linalg.lstsq(centered[["n_tokens", "after"]].to_numpy(float), centered["reward"].to_numpy(float), rcond=None)[0]
    return float(coef[0]), float(coef[1])


def fmt(value: float, ci) -> str:
    return f"{value:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--round", type=int, default=0, help="the DPO round to check (its texts and the next round's)")
    args = parser.parse_args(argv)
    run, t = args.run, args.round
    try:
        config = load_run_config(run)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    both = validation_rewards(run, config, t)
    if both is None:
        print(f"error: {run} has no validation rewards of round {t} or no embeddings of round {t + 1}", file=sys.stderr)
        return 2
    before_rewards, after_rewards = both
    users = before_rewards["user_index"].unique()
    before = with_length(before_rewards, read_parquet(round_dir(run, t) / "generate" / "knowledge.parquet"))
    after = with_length(after_rewards, read_parquet(round_dir(run, t + 1) / "generate" / "knowledge.parquet"))
    seed = config.data.seed

    print(f"validation users {len(users)}; sampled texts: round {t} {len(before)}, round {t + 1} {len(after)}")
    for name, table in ((f"round {t}", before), (f"round {t + 1}", after)):
        print(f"  {name}: {table['n_tokens'].mean():.1f} tokens, {1 - table['at_limit'].mean():.1%} ended before the limit, "
              f"mean reward {table['reward'].mean():+.4f}")
    drift = sampled_drift(before, after, seed)
    print(f"validation drift, all sampled texts: {fmt(drift['validation_reward_drift'], drift['validation_reward_drift_ci95'])} "
          f"({drift['users']} users)")
    at_limit = sampled_drift(before[before["at_limit"]], after[after["at_limit"]], seed)
    if at_limit:
        print(f"validation drift, texts at the token limit in both rounds: "
              f"{fmt(at_limit['validation_reward_drift'], at_limit['validation_reward_drift_ci95'])} ({at_limit['users']} users)")
    per_token, round_coef = round_effect(before, after)
    print(f"within users, reward ~ tokens + round: {per_token:+.6f} a token, round {round_coef:+.4f} "
          f"(round alone: {round_effect(before.assign(n_tokens=0), after.assign(n_tokens=0))[1]:+.4f})")

    pairs = read_parquet(round_dir(run, t) / "heldout" / "pairs.parquet")
    tokens = before.set_index(["user_index", "sample"])["n_tokens"]
    chosen = tokens.reindex(pd.MultiIndex.from_arrays([pairs["user_index"], pairs["sample_chosen"]])).to_numpy()
    rejected = tokens.reindex(pd.MultiIndex.from_arrays([pairs["user_index"], pairs["sample_rejected"]])).to_numpy()
    correct = pair_correct(pairs)
    for name, keep in (("all pairs", np.ones(len(pairs), bool)), ("equal length", chosen == rejected),
                       ("chosen shorter", chosen < rejected), ("chosen longer", chosen > rejected)):
        if keep.any():
            accuracy, ci = accuracy_ci(pairs["user_index"].to_numpy()[keep], correct[keep], seed)
            print(f"held-out pair accuracy, {name}: {accuracy:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] ({int(keep.sum())} pairs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
