"""Benchmark one DPO round on CPU: TRL as shipped vs. with completion-only LM-head scoring.

    python benchmarks/dpo.py --pairs runs/default/round_0/preferences/pairs.parquet
    python benchmarks/dpo.py --pairs P --n 8 --json dpo.json --threads 2

Both settings train the same adapter on the same real preference pairs (a
reward stage's pairs.parquet: ML-1M prompts of ~530 tokens, ~60-token
answers) with the default [align] settings, one after the other in this
process; the table gives seconds per pair and the ratio. The logged
log-probabilities of the two must agree (the change is speed only).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from dpo4rec.align import dpo
from dpo4rec.config import AlignConfig, ModelConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="runs/default/round_0/preferences/pairs.parquet", help="a reward stage's pairs.parquet")
    parser.add_argument("--n", type=int, default=16, help="pairs to train on")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if not Path(args.pairs).is_file():
        print(f"dpo.py: error: {args.pairs} not found; run 'dpo4rec run' first (or pass --pairs)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    pairs = pd.read_parquet(args.pairs).head(args.n)
    import trl.trainer.utils as trl_utils

    shipped = trl_utils._use_triton
    rows = []
    for name in ("TRL as shipped (every position)", "completion positions only (ours)"):
        if name.startswith("TRL"):
            trl_utils._use_triton, trl_utils._dpo4rec_compact = shipped, True  # keep TRL's own choice
        else:
            trl_utils._use_triton, trl_utils._dpo4rec_compact = shipped, False  # train_dpo patches it
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            history = dpo.train_dpo(pairs, ModelConfig(), AlignConfig(), [], Path(out))
            seconds = time.perf_counter() - start
        first = history["steps"][0]
        rows.append({"method": name, "pairs": len(pairs), "seconds": round(seconds, 1), "train_runtime_s": history["train_runtime_s"],
                     "s_per_pair": round(seconds / len(pairs), 2), "first_step_logps_chosen": first["logps/chosen"]})
    ratio = rows[0]["seconds"] / rows[1]["seconds"]
    print(f"| method | pairs | s (stage) | s (trainer) | s/pair |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['pairs']} | {r['seconds']} | {r['train_runtime_s']:.1f} | {r['s_per_pair']} |")
    print(f"ours is {ratio:.2f}x faster; first-step logps/chosen {rows[0]['first_step_logps_chosen']:.3f} vs {rows[1]['first_step_logps_chosen']:.3f}")
    if args.json:
        info = {"machine": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__}
        Path(args.json).write_text(json.dumps({"rows": rows, "speedup": ratio, **info}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
