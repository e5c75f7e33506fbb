"""What the run tests share: the tiny config, the subprocess environment, the console script, an own data folder."""

import os
import subprocess
import sys
from pathlib import Path

from dpo4rec.data import load_dataset

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def same_threads() -> None:
    """Subprocesses compute with as many threads as this process: bf16 products round differently with another
    thread count, sampled texts then differ, and so would everything downstream (other test modules set 1 thread)."""
    import torch

    ENV["OMP_NUM_THREADS"] = str(torch.get_num_threads())


def cli(*args) -> subprocess.CompletedProcess:
    """``dpo4rec ARGS`` as a user runs it (a new process), output captured."""
    return subprocess.run([sys.executable, "-m", "dpo4rec", *map(str, args)], capture_output=True, text=True, env=ENV)


ODD_TITLES = ['Quotes "inside" and {braces} {0}', "Tab\tand\nnewline", "Émoji 🎬 and ünïcode", "x" * 100_000]


def own_folder(folder, ratings_scale=1):
    """ML-100k rewritten with string ids (u12, i345), a few odd titles, ratings multiplied by ``ratings_scale``."""
    data = load_dataset("ml-100k")
    folder.mkdir()
    inter = data.interactions.copy()
    inter["user_id"] = "u" + inter["user_id"].astype(str)
    inter["item_id"] = "i" + inter["item_id"].astype(str)
    inter["rating"] = inter["rating"] * ratings_scale
    inter[["user_id", "item_id", "rating", "timestamp"]].to_csv(folder / "interactions.csv", index=False)
    items = data.items[["item_id", "title"]].copy()
    popular = inter["item_id"].value_counts().index[: len(ODD_TITLES)]  # in many users' histories
    items["item_id"] = "i" + items["item_id"].astype(str)
    items.loc[items["item_id"].isin(popular), "title"] = ODD_TITLES[: len(popular)]
    items.to_csv(folder / "items.csv", index=False)
    return folder
