"""Best or greedy texts for the recommender's train users, on a finished round of any run:

    python experiments/train_text.py RUN --round 0 --out SCRATCH [--json F]

Trains the round's recommender twice, on greedy texts and on each sampled
train user's best-rewarded text (``recommend.train_text``), in SCRATCH (the
run's data, embeddings and rewards are linked there, nothing in RUN is
written), and prints best minus greedy on validation and test users with 95%
paired bootstrap intervals. For runs made before train_text existed (their
config.json lacks the key, so `dpo4rec run` refuses to continue them).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from dpo4rec.artifacts import round_dir
from dpo4rec.recommend import model_name, run_recommend_stage
from dpo4rec.report.report import best_minus_greedy
from dpo4rec.run import load_run_config
from scratch import link_from_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--round", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="scratch folder for the two recommenders")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    config = load_run_config(args.run)
    source, here = round_dir(args.run, args.round), round_dir(args.out, args.round)
    link_from_run(args.run, args.out, "data", f"{source.name}/embeddings", f"{source.name}/preferences")
    folders = {}
    for text in ("greedy", "best"):
        recommend = replace(config.recommend, knowledge=True, train_text=text)
        result = run_recommend_stage(recommend, args.out, args.round)
        folders[text] = here / "recommender" / model_name(recommend)
        if text == "best":
            print("best texts:", json.dumps(result.metrics["best_text"]))
    rows = best_minus_greedy(folders["best"], folders["greedy"], config.data.seed)
    print("| users | metric | best | greedy | best - greedy [95% CI] |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['split']} ({r['users']}) | {r['metric']} | {r['best']:.4f} | {r['greedy']:.4f} "
              f"| {r['diff']:+.4f} [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] |")
    if args.json:
        args.json.write_text(json.dumps({"round": args.round, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
