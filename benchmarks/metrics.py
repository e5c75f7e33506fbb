"""rerank_metrics speed: vectorized NumPy against a per-list Python loop (KAR's style).

    python benchmarks/metrics.py [--lists 1000000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

from dpo4rec.metrics import rerank_metrics


def loop_metrics(labels, scores, ks=(1, 3, 5, 7)):
    """The per-list loop a script would write: sort, then sum, list by list."""
    out = {f"{m}@{k}": [] for k in ks for m in ("map", "ndcg")}
    for lab, sco in zip(labels.tolist(), scores.tolist()):
        ranked = [l for _, l in sorted(zip(sco, lab), key=lambda p: p[0], reverse=True)]
        ideal = sorted(lab, reverse=True)
        for k in ks:
            dcg = sum((2**l - 1) / math.log2(i + 2) for i, l in enumerate(ranked[:k]))
            idcg = sum((2**l - 1) / math.log2(i + 2) for i, l in enumerate(ideal[:k]))
            hits, precision = 0, 0.0
            for i, l in enumerate(ranked[:k]):
                if l > 0:
                    hits += 1
                    precision += hits / (i + 1)
            out[f"map@{k}"].append(precision / hits if hits else 0.0)
            out[f"ndcg@{k}"].append(dcg / idcg if idcg else 0.0)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lists", type=int, default=1_000_000)
    parser.add_argument("--loop-lists", type=int, default=20_000, help="the loop is timed on fewer lists (a rate)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(args.lists, 10))
    scores = rng.random((args.lists, 10))
    runs = []
    for _ in range(3):  # the first call also pays for page faults on fresh arrays: report the best
        start = time.perf_counter()
        rerank_metrics(labels, scores)
        runs.append(time.perf_counter() - start)
    ours = min(runs)
    n = min(args.loop_lists, args.lists)
    start = time.perf_counter()
    loop_metrics(labels[:n], scores[:n])
    loop = (time.perf_counter() - start) * args.lists / n
    print(f"{'method':<12}{'lists':>12}{'seconds':>10}{'lists/s':>14}")
    print(f"{'vectorized':<12}{args.lists:>12,}{ours:>10.2f}{args.lists / ours:>14,.0f}")
    print(f"{'loop':<12}{args.lists:>12,}{loop:>10.2f}{args.lists / loop:>14,.0f}   (timed on {n:,} lists)")
    print(f"vectorized is {loop / ours:.0f}x the loop (vectorized runs: {', '.join(f'{r:.2f}' for r in runs)} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"lists": args.lists, "seconds": {"vectorized": ours, "loop_extrapolated": loop}, "ratio": loop / ours}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
