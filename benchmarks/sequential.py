"""SASRec without knowledge on full ranking (leave-one-out), on a whole data set: quality and time.

    python benchmarks/sequential.py --dataset amazon-beauty --json beauty.json
    python benchmarks/sequential.py --dataset ml-1m --json ml1m.json

Every user's sequence trains (the last two items removed); each user's
second-to-last item validates (the epoch with the best NDCG@10 is kept) and
the last item tests, ranked against every item the user had not interacted
with before it (recommend/sequential.py). Writes hr@K and ndcg@K for K = 5,
10, 20 on the test targets, the validation curve and the seconds; the
published SASRec numbers these compare with are in docs/sequential.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dpo4rec.config import RecommendConfig
from dpo4rec.data import load_dataset
from dpo4rec.data.next_item import item_sequences, item_vocabulary
from dpo4rec.metrics import mean_metrics
from dpo4rec.recommend.models import ModelSpec, build_model
from dpo4rec.recommend.sequential import evaluate_next_item, next_item_data, train_sequential

SHARED_BEAUTY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "amazon-beauty"
# Per data set, as the SASRec authors ran them (max_len 50 on Beauty, 200 on ML-1M; dropout 0.5 on the sparse
# Beauty, 0.2 on ML-1M); width 64 and 2 blocks as in RecBole's defaults. Epochs: with the full cross-entropy
# validation NDCG@10 stops rising within these on 2 cores' budget.
SETTINGS = {
    "amazon-beauty": dict(max_len=50, embed_dim=64, n_heads=1, n_layers=2, dropout=0.5, lr=2e-3, batch_size=256, max_epochs=30, patience=5),
    "ml-1m": dict(max_len=200, embed_dim=64, n_heads=1, n_layers=2, dropout=0.2, lr=1e-3, batch_size=128, max_epochs=40, patience=5),
}


def cpu_name() -> str:
    """The CPU's model name, and whether it has AMX (the two CPU kinds these budgets are set for differ by it)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), platform.machine())
    return f"{name} ({'AMX' if 'amx_tile' in info else 'no AMX'})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="amazon-beauty", choices=sorted(SETTINGS))
    parser.add_argument("--path", help="data folder (default: ../shared/data/amazon-beauty for amazon-beauty)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--epochs", type=int, help="at most this many epochs (default per data set)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = dict(SETTINGS[args.dataset])
    if args.epochs:
        settings["max_epochs"] = args.epochs
    path = args.path or (str(SHARED_BEAUTY) if args.dataset == "amazon-beauty" else None)

    start = time.perf_counter()
    dataset = load_dataset(args.dataset, path)
    _, sequences = item_sequences(dataset.interactions, item_vocabulary(dataset.interactions["item_id"]))
    max_len = settings.pop("max_len")
    data = next_item_data(sequences, max_len)
    config = RecommendConfig(backbone="sasrec", knowledge=False, seed=args.seed, device=args.device, **settings)
    torch.manual_seed(config.seed)
    model = build_model(ModelSpec(backbone="sasrec", n_items=data.n_items, list_size=0, history_len=max_len, embed_dim=config.embed_dim,
                                  hidden_dim=config.hidden_dim, n_heads=config.n_heads, n_layers=config.n_layers, dropout=config.dropout))
    result = train_sequential(model, data, None, config, progress=sys.stderr.isatty())
    test = mean_metrics(evaluate_next_item(model, data.test, None, config))
    seconds = time.perf_counter() - start
    out = {
        **{k: round(v, 4) for k, v in test.items()},
        "seconds": round(seconds, 1),
        "dataset": args.dataset, "users": len(sequences), "items": data.n_items,
        "interactions": int(sum(len(s) for s in sequences)),
        "best_epoch": result.best_epoch, "epochs": len(result.curve),
        "seconds_per_epoch": round(float(np.mean([r["train_seconds"] for r in result.curve])), 1),
        "settings": {"max_len": max_len, **settings, "loss": "cross-entropy over all items"},
        "curve": [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in result.curve],
        "machine": {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__},
    }
    print(f"SASRec, {args.dataset}: {out['users']:,} users, {out['items']:,} items, full ranking, leave-one-out (test targets)")
    print(f"{'metric':<10}" + "".join(f"{k:>10}" for k in ("@5", "@10", "@20")))
    for name in ("hr", "ndcg"):
        print(f"{name:<10}" + "".join(f"{test[f'{name}@{k}']:>10.4f}" for k in (5, 10, 20)))
    print(f"best epoch {result.best_epoch} of {len(result.curve)}, {out['seconds_per_epoch']} s per epoch, {seconds:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
