"""A run's round 0 with its sampled texts drawn again under other sampling settings (temperature, top-p).

    python experiments/resample.py RUN OUT --temperature 0.7 [--top-p 0.9] [--seed 0]

At temperature 1 and top-p 0.9 (the default), SmolLM2-135M's samples are
mostly invention (occupations, film titles and people that are not in the
prompt), so two of a user's texts may differ in ways no reward can tie to
the user. Here every user that has samples in RUN gets N new ones from the
base model (the pipeline's sampler) under the new settings; greedy texts,
data, prompts and the round's recommenders are the run's own (greedy texts do
not depend on these settings), and the texts are encoded again (the encode
stage, with a copy of the run's embedding cache). OUT is then a run folder
that the other experiments read like RUN (its config.json names the new
settings, so experiments/positive_control.py samples its drift the same way).
RUN is only read.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from positive_control import sample_texts
from scratch import link_from_run
from dpo4rec.artifacts import read_parquet, write_parquet
from dpo4rec.config import EncodeConfig, GenerateConfig, ModelConfig
from dpo4rec.encode.stage import run_encode_stage


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--temperature", type=float, required=True)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, help="sampler seed (default: the run's generate.seed)")
    args = parser.parse_args(argv)
    config = json.loads((args.run / "config.json").read_text())
    changes = {"temperature": args.temperature, **({"top_p": args.top_p} if args.top_p is not None else {}),
               **({"seed": args.seed} if args.seed is not None else {})}
    config["generate"].update(changes)
    gen = GenerateConfig(**config["generate"])

    link_from_run(args.run, args.out, "data", "prompts", "round_0/recommender")
    if not (args.out / "cache").exists():
        shutil.copytree(args.run / "cache", args.out / "cache")  # the encode stage adds the new texts to it
    (args.out / "config.json").write_text(json.dumps(config, indent=2))

    knowledge = read_parquet(args.run / "round_0" / "knowledge" / "knowledge.parquet")
    users = np.unique(knowledge.loc[knowledge["sample"] > 0, "user_index"])
    prompts = read_parquet(args.run / "prompts" / "prompts.parquet")
    new = sample_texts(users, prompts, ModelConfig(**config["model"]), gen, [], gen.seed)
    table = pd.concat([knowledge[knowledge["sample"] == 0], new[knowledge.columns]], ignore_index=True)
    write_parquet(args.out / "round_0" / "knowledge" / "knowledge.parquet", table.sort_values(["user_index", "sample"]).reset_index(drop=True))
    run_encode_stage(EncodeConfig(**config["encode"]), args.out, 0)
    print(f"{len(new)} new samples of {len(users)} users at {changes}: {new['n_tokens'].mean():.1f} tokens a text, "
          f"{(new['n_tokens'] < gen.max_new_tokens).mean():.0%} end before the token limit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
