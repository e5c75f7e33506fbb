"""Benchmark the re-rankers: train-epoch time per backbone, and reward-scoring throughput.

    python benchmarks/recommend.py                 # ML-1M, all users
    python benchmarks/recommend.py --quick         # ML-1M, 600 users, 200 users x 10 samples
    python benchmarks/recommend.py --json out.json --threads 2

Knowledge vectors are random unit vectors of the encoder's size (384): the
time does not depend on what they say, and the benchmark needs no encoder.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time

import numpy as np
import torch

from dpo4rec.config import DataConfig, RecommendConfig
from dpo4rec.data.stage import read_protocol, run_data_stage
from dpo4rec.recommend.features import list_tensors, user_knowledge
from dpo4rec.recommend.models import rerankers
from dpo4rec.reward.scorers import RewardScorer
from dpo4rec.recommend.train import build_recommender, train_recommender

DIM = 384


def unit_vectors(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 600-user subset and 200 reward users")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--samples", type=int, default=10, help="knowledge samples per user for the reward")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_users, reward_users = (600, 200) if args.quick else (None, 1000)

    with tempfile.TemporaryDirectory() as tmp:
        run_data_stage(tmp, DataConfig(dataset="ml-1m", n_users=n_users))
        protocol = read_protocol(f"{tmp}/data")
    lists = list_tensors(protocol.lists)
    item_index = protocol.items["item_index"].to_numpy()
    items = (item_index, unit_vectors(len(item_index), 1))
    knowledge = user_knowledge(len(protocol.users), np.arange(len(protocol.users)), unit_vectors(len(protocol.users), 2))

    rows = []
    for backbone in rerankers():
        for with_knowledge in (False, True):
            config = RecommendConfig(backbone=backbone, knowledge=with_knowledge, max_epochs=1, device=args.device)
            model = build_recommender(config, protocol.items, lists, DIM if with_knowledge else None, items if with_knowledge else None)
            result = train_recommender(model, lists, knowledge if with_knowledge else None, config, progress=False)
            row = {"backbone": backbone, "knowledge": with_knowledge, "train_epoch_s": result.curve[0]["train_seconds"]}
            if with_knowledge:
                row.update(reward_throughput(model, lists, protocol, reward_users, args.samples))
            rows.append(row)
            print_row(row, first=len(rows) == 1)
    report = {
        "dataset": "ml-1m", "users": len(protocol.users), "train_lists": int((lists.split == "train").sum()),
        "threads": args.threads, "device": args.device, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def reward_throughput(model, lists, protocol, n_users: int, n_samples: int) -> dict:
    users = protocol.users.loc[protocol.users["split"] == "train", "user_index"].to_numpy()[:n_users]
    rows = np.repeat(users, n_samples)
    vectors = unit_vectors(len(rows), 3)
    scorer = RewardScorer(model, lists)
    scorer.score(rows[:n_samples], vectors[:n_samples])  # warm-up
    start = time.perf_counter()
    scorer.score(rows, vectors)
    seconds = time.perf_counter() - start
    n_lists = int(np.isin(lists.user_index.numpy(), users).sum())
    return {"reward_users": len(users), "reward_samples": n_samples, "reward_s": seconds,
            "samples_per_s": len(rows) / seconds, "list_scores_per_s": n_lists * n_samples / seconds}


def print_row(row: dict, first: bool) -> None:
    if first:
        print(f"{'backbone':<9} {'knowledge':<9} {'train epoch s':>13} {'reward s':>9} {'samples/s':>10} {'lists/s':>10}")
    reward = (f"{row['reward_s']:9.2f} {row['samples_per_s']:10.0f} {row['list_scores_per_s']:10.0f}"
              if "reward_s" in row else f"{'-':>9} {'-':>10} {'-':>10}")
    print(f"{row['backbone']:<9} {'on' if row['knowledge'] else 'off':<9} {row['train_epoch_s']:13.2f} {reward}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
