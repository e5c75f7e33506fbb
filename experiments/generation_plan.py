"""Round 0's generation of a finished run, replayed with two batch plans: one prefill per batch of at most 16,384
prompt tokens (the earlier default) against prefill chunks of 4,096 tokens in batches of up to 65,536 (now).

    python experiments/generation_plan.py RUN [--repeat 1]

RUN: a run folder with data/ and prompts/ (its [generate] sizes are read from RUN/config.json). Prints each
batch's users and seconds and each plan's total; the texts are not written anywhere. Plans alternate when
--repeat > 1 (the machine's speed drifts).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from dpo4rec.config import GenerateConfig
from dpo4rec.generate.model import best_dtype, load_model, load_tokenizer
from dpo4rec.generate.sampler import FastSampler, batch_generator
from dpo4rec.generate.stage import _settings, make_plan


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)
    saved = json.loads((args.run / "config.json").read_text())["generate"]
    now = GenerateConfig(**{k: v for k, v in saved.items() if k in GenerateConfig.__dataclass_fields__})
    now = replace(now, max_prefill_tokens=65536, prefill_chunk_tokens=4096)
    before = replace(now, max_prefill_tokens=16384, prefill_chunk_tokens=1 << 30)
    prompts = pd.read_parquet(args.run / "prompts" / "prompts.parquet")
    users = pd.read_parquet(args.run / "data" / "users.parquet")
    text = prompts.set_index("user_index")["text"]
    tokenizer = load_tokenizer("smollm2-135m")
    sampler = FastSampler(load_model("smollm2-135m", dtype=best_dtype("cpu")), [tokenizer.eos_token_id], tokenizer.pad_token_id)
    for _ in range(args.repeat):
        for name, gen in (("before (16,384 a batch, one prefill)", before), ("now (65,536 a batch, 4,096-token chunks)", now)):
            start = time.perf_counter()
            for number, batch in enumerate(make_plan(prompts, users, gen)):
                ids = [tokenizer(text[u], add_special_tokens=False)["input_ids"] for u in batch["users"]]
                t = time.perf_counter()
                sampler.sample(ids, _settings(gen, batch["sampled"]), batch_generator(gen.seed, number))
                print(f"  batch {number}: {len(ids)} users, sampled {batch['sampled']}: {time.perf_counter() - t:.1f} s", flush=True)
            print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
