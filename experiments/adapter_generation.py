"""Greedy generation with a DPO adapter applied unmerged: the prefill through PEFT's layers vs our fused weights.

    python experiments/adapter_generation.py RUN [--users 32]

Times the shared-prefix sampler on RUN's first prompts three ways: the base
model, base + round 0's adapter with the prefill run by the model's own
forward (PEFT's per-layer LoRA, as before), and with the prefill on the
sampler's fused weights (the adapter as low-rank terms, as now). Prints the
seconds and how many greedy texts the two adapter paths share (bf16 rounding
differs between them, so long greedy texts can part ways).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from dpo4rec.generate.model import load_model, load_tokenizer, parse_dtype
from dpo4rec.generate.sampler import FastSampler, SamplerSettings, batch_generator


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--users", type=int, default=32)
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer("smollm2-135m")
    texts = pd.read_parquet(args.run / "prompts" / "prompts.parquet")["text"].tolist()[: args.users]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    settings = SamplerSettings(n_samples=1, temperature=1.0, top_p=0.9, max_new_tokens=64, greedy=True)
    dtype = parse_dtype("auto")
    base = load_model("smollm2-135m", dtype=dtype)
    adapted = load_model("smollm2-135m", adapters=[args.run / "round_0" / "adapter"], dtype=dtype)
    texts_by = {}
    for name, model, prefill in (("base model", base, "_prefill_model"), ("adapter, PEFT prefill", adapted, "_prefill_model"),
                                 ("adapter, fused prefill", adapted, "_prefill_fused")):
        sampler = FastSampler(model, [tokenizer.eos_token_id], tokenizer.pad_token_id)
        # which prefill runs: the model's own forward (PEFT's LoRA layers inside) or the sampler's fused weights
        sampler.fast.prefill = getattr(sampler.fast, prefill)
        start = time.perf_counter()
        out = sampler.sample(prompts, settings, batch_generator(0, 0))
        print(f"{name}: {time.perf_counter() - start:.1f} s for {len(prompts)} greedy users", flush=True)
        texts_by[name] = [c[0].token_ids for c in out]
    same = sum(a == b for a, b in zip(texts_by["adapter, PEFT prefill"], texts_by["adapter, fused prefill"]))
    print(f"identical greedy texts, PEFT vs fused prefill: {same} / {len(prompts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
