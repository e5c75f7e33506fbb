"""How much of a difference between two rounds' recommenders is the recommender's own training noise?

    python experiments/recommender_seeds.py RUN --out SCRATCH --seeds 0 1 2 [--rounds 0 1] [--ids] [--json F]

The report's intervals resample test users, with each arm's recommender
trained once; they do not include how much a recommender moves with its
training seed. This retrains each round's knowledge-augmented recommender
(greedy texts, the run's config) with several seeds in SCRATCH (the run's
data and embeddings are linked there; nothing in RUN is written) and prints
test MAP@5 / NDCG@5 per round and seed, and per seed the difference of each
later round with round 0 with its 95% paired bootstrap interval over test
users. A DPO round's gain that is real holds across seeds; one that is
training noise changes sign. ``--ids`` also retrains the ID-only recommender
(no knowledge) per seed and compares round 0 with it (KAR's gain). Rerunning
with the same SCRATCH reuses the recommenders already trained there.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from dpo4rec.artifacts import read_parquet, round_dir
from dpo4rec.recommend import model_name, run_recommend_stage
from dpo4rec.report.bootstrap import paired_bootstrap
from dpo4rec.run import load_run_config
from scratch import link_from_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, nargs="+", help="default: every round of the run")
    parser.add_argument("--ids", action="store_true", help="also the ID-only recommender, against round 0")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    config = load_run_config(args.run)
    rounds = args.rounds or list(range(config.run.rounds + 1))
    tables, rows = {}, []
    for seed in args.seeds:
        for t in rounds:
            scratch = args.out / f"seed_{seed}"
            here = round_dir(scratch, t)
            link_from_run(args.run, scratch, "data", f"{here.name}/embeddings")
            recommend = replace(config.recommend, knowledge=True, train_text="greedy", seed=seed)
            run_recommend_stage(recommend, scratch, t, progress=False)
            tables[seed, t] = read_parquet(here / "recommender" / model_name(recommend) / "test_lists.parquet")
            row = {"seed": seed, "round": t, **{m: float(tables[seed, t][m].mean()) for m in ("map@5", "ndcg@5")}}
            if t != rounds[0]:
                base = tables[seed, rounds[0]]
                for m in ("map@5", "ndcg@5"):
                    diff, ci = paired_bootstrap(base["user_index"].to_numpy(), tables[seed, t][m].to_numpy(), base[m].to_numpy(),
                                                seed=config.data.seed)
                    row[f"{m}_minus_round_{rounds[0]}"] = {"diff": diff, "ci95": list(ci)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.ids:
            ids = replace(config.recommend, knowledge=False, train_text="greedy", seed=seed)
            run_recommend_stage(ids, args.out / f"seed_{seed}", 0, progress=False)
            table = read_parquet(round_dir(args.out / f"seed_{seed}", 0) / "recommender" / model_name(ids) / "test_lists.parquet")
            base = tables[seed, rounds[0]]
            row = {"seed": seed, "round": "ids", **{m: float(table[m].mean()) for m in ("map@5", "ndcg@5")}}
            for m in ("map@5", "ndcg@5"):
                diff, ci = paired_bootstrap(base["user_index"].to_numpy(), base[m].to_numpy(), table[m].to_numpy(), seed=config.data.seed)
                row[f"round_{rounds[0]}_minus_ids_{m}"] = {"diff": diff, "ci95": list(ci)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n| seed | round | MAP@5 | NDCG@5 | MAP@5 - round {rounds[0]} [95% CI] (ids: round {rounds[0]} - ids) |\n|---|---|---|---|---|")
    for r in rows:
        change = r.get(f"map@5_minus_round_{rounds[0]}") or r.get(f"round_{rounds[0]}_minus_ids_map@5")
        text = f"{change['diff']:+.4f} [{change['ci95'][0]:+.4f}, {change['ci95'][1]:+.4f}]" if change else "-"
        print(f"| {r['seed']} | {r['round']} | {r['map@5']:.4f} | {r['ndcg@5']:.4f} | {text} |")
    arms = [*rounds, "ids"] if args.ids else rounds
    spread = {t: float(np.std([r["map@5"] for r in rows if r["round"] == t], ddof=1)) if len(args.seeds) > 1 else None for t in arms}
    print(f"\nMAP@5 standard deviation over seeds, per round: {spread}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "map@5_seed_std": spread}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
