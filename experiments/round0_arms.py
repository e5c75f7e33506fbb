"""Round 0's test arms of a run (base LLM vs ID-only), for runs stopped before the report.

    python experiments/round0_arms.py RUN [--backbone prm]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from dpo4rec.report.bootstrap import paired_bootstrap


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--backbone", default="prm")
    args = parser.parse_args(argv)
    folder = args.run / "round_0" / "recommender"
    arms = {"base_llm": folder / args.backbone, "no_knowledge": folder / f"{args.backbone}-no-knowledge"}
    lists = {arm: pd.read_parquet(path / "test_lists.parquet") for arm, path in arms.items()}
    users = lists["base_llm"]["user_index"].to_numpy()
    assert (users == lists["no_knowledge"]["user_index"].to_numpy()).all()
    print(f"{args.run}: {len(set(users))} test users, {len(users)} test lists")
    print("| metric | base_llm | no_knowledge | base_llm - no_knowledge [95% CI] |")
    print("|---|---|---|---|")
    for metric in ("map@5", "ndcg@5", "map@1", "ndcg@1"):
        a, b = lists["base_llm"][metric].to_numpy(), lists["no_knowledge"][metric].to_numpy()
        diff, (low, high) = paired_bootstrap(users, a, b)
        print(f"| {metric} | {a.mean():.4f} | {b.mean():.4f} | {diff:+.4f} [{low:+.4f}, {high:+.4f}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
