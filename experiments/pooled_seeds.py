"""Held-out pair accuracy pooled over DPO seeds: does the align stage, over its own randomness, carry to unseen users?

    python experiments/pooled_seeds.py RUN LEVERS/seed1 LEVERS/seed2 ...

One run's held-out interval resamples validation users for one trained adapter; the adapter's random init,
dropout and pair order move the accuracy by about as much (docs/results.md). Given the run's round-0 check and
the folders that ``experiments/dpo_levers.py`` wrote for other seeds of the same round (same pairs, same
validation texts), this scores every validation pair under each adapter, averages each pair's correctness over
the adapters (ties count half), and bootstraps that mean over validation users. Prints one line per adapter
and the pooled line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from dpo4rec.align.heldout import accuracy_ci, pair_correct, pair_margins
from dpo4rec.artifacts import read_json


def accuracy(users: np.ndarray, correct: np.ndarray) -> str:
    point, (low, high) = accuracy_ci(users, correct)
    return f"{point:.3f} [{low:.3f}, {high:.3f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished run (its round_0/heldout is the first adapter)")
    parser.add_argument("variants", type=Path, nargs="+", help="dpo_levers.py variant folders (heldout_texts.parquet)")
    args = parser.parse_args(argv)
    heldout = args.run / "round_0" / "heldout"
    sources = {"run": heldout / "texts.parquet", **{str(v): v / "heldout_texts.parquet" for v in args.variants}}
    missing = [str(p) for p in [heldout / "pairs.parquet", args.run / "config.json", *sources.values()] if not p.is_file()]
    if missing:
        print(f"pooled_seeds.py: error: {missing[0]} not found", file=sys.stderr)
        return 2
    pairs = pd.read_parquet(heldout / "pairs.parquet")
    beta = read_json(args.run / "config.json")["align"]["beta"]
    users = pairs["user_index"].to_numpy()
    per_adapter = []
    for name, path in sources.items():
        correct = pair_correct(pair_margins(pairs, pd.read_parquet(path), beta))
        per_adapter.append(correct)
        print(f"{name}: held-out pair accuracy {accuracy(users, correct)}")
    pooled = np.mean(per_adapter, axis=0)
    print(f"pooled over {len(per_adapter)} adapters ({len(pairs)} pairs, {len(np.unique(users))} users): {accuracy(users, pooled)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
