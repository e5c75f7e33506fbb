"""Does DPO carry to unseen users what a linear probe of the same train users carries? Finished runs, side by side.

    python experiments/probe_vs_dpo.py RUN [RUN ...] [--round 0]
    python experiments/probe_vs_dpo.py RUN --texts OUT/VARIANT/heldout_texts.parquet ...   # positive_control.py's adapters

For each run: held-out pair accuracy of its DPO round (heldout/summary.json),
the reward probe of the pipeline (align/probe.py: a ridge from the text's
vector and length fitted on the train users' within-user-centred rewards,
penalty by cross-validation over train users) on the same validation pairs,
and a probe that sees only what DPO saw: the run's train pairs, winner and
loser, fitted as a ridge on (chosen - rejected) features towards +1, at three
penalties. Reads the run folder only (runs made before the probe existed too).
``--texts``: the held-out log-ratios of other adapters trained on the run's round
(positive_control.py writes them), each read against the reward and against the
probe's order: did DPO learn the probe's preference, and how much of the
reward does that preference carry?
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from dpo4rec.align.probe import fit_probe, probe_features, reward_probe, ridge
from dpo4rec.align.reliability import agreement
from dpo4rec.encode import read_embeddings


def ci(value: float, interval: list[float]) -> str:
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--round", type=int, default=0)
    parser.add_argument("--texts", type=Path, nargs="+", default=[], help="heldout_texts.parquet files of adapters on RUN")
    args = parser.parse_args(argv)
    print("| run | train pairs | DPO: held-out pair accuracy [95% CI] | reward probe [95% CI] (alpha) "
          "| probe of the train pairs alone, alpha 1 / 10 / 100 |")
    print("|---|---|---|---|---|")
    for run in args.runs:
        here = run / f"round_{args.round}"
        embeddings = read_embeddings(here / "embeddings")
        knowledge = pd.read_parquet(here / "knowledge" / "knowledge.parquet")
        train = pd.read_parquet(here / "preferences" / "rewards.parquet")
        validation = pd.read_parquet(here / "preferences" / "validation_rewards.parquet")
        pairs = pd.read_parquet(here / "preferences" / "pairs.parquet")
        heldout = json.loads((here / "heldout" / "summary.json").read_text())
        probe = reward_probe(embeddings, knowledge, train, validation)
        table, features = probe_features(train, embeddings, knowledge)
        row = {key: i for i, key in enumerate(zip(table["user_index"], table["sample"]))}
        difference = np.array([features[row[(u, c)]] - features[row[(u, r)]]
                               for u, c, r in zip(pairs["user_index"], pairs["sample_chosen"], pairs["sample_rejected"])])
        scored, validation_features = probe_features(validation, embeddings, knowledge)
        pairwise = [agreement(scored, scored.assign(reward=validation_features @ ridge(difference, np.ones(len(difference)), alpha)))
                    ["pair_agreement"] for alpha in (1.0, 10.0, 100.0)]
        print(f"| {run.name} | {len(pairs)} | {ci(heldout['heldout_pair_accuracy'], heldout['heldout_pair_accuracy_ci95'])} "
              f"| {ci(probe['pair_accuracy'], probe['pair_accuracy_ci95'])} ({probe['alpha']:g}) "
              f"| {' / '.join(f'{a:.3f}' for a in pairwise)} |", flush=True)
    if args.texts:  # the probe fitted on every sampled train user of the last run, as the pipeline's reward_probe
        probe_order = scored.assign(reward=validation_features @ fit_probe(train, embeddings, knowledge)[0])
        print("\n| adapter | log-ratio vs the reward | log-ratio vs the probe's order | probe vs the reward |\n|---|---|---|---|")
        for path in args.texts:
            texts = pd.read_parquet(path)
            ratio = texts.assign(reward=texts["policy"] - texts["reference"])[["user_index", "sample", "reward"]]
            print(f"| {path.parent.name} | {agreement(scored, ratio)['pair_agreement']:.3f} | "
                  f"{agreement(probe_order, ratio)['pair_agreement']:.3f} | {agreement(scored, probe_order)['pair_agreement']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
