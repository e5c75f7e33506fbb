"""A real ML-100k run folder (data stage, fixture knowledge texts, MiniLM encoding), shared by these tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dpo4rec.config import DataConfig, EncodeConfig
from dpo4rec.data.stage import read_protocol, run_data_stage
from dpo4rec.encode.stage import read_embeddings, run_encode_stage

# Users whose knowledge the fixture leaves out, to exercise the "unknown" policy.
MISSING_USERS = 5


def write_fixture_knowledge(run: Path, n_samples: int = 2, seed: int = 0) -> pd.DataFrame:
    """What an LLM could infer from each user's prompt history: favourite genres and liked titles.

    Sample 0 is the "greedy" text (top genres, latest liked titles); samples
    1..n vary the choice at random, as sampled LLM texts would.
    """
    protocol = read_protocol(run / "data")
    items = protocol.items.set_index("item_index")
    inter = protocol.interactions
    liked = inter[inter["in_prompt"] & (inter["label"] == 1)]
    rng = np.random.default_rng(seed)
    rows = []
    for user, group in liked.groupby("user_index"):
        genres = items.loc[group["item_index"], "genres"].str.split("|").explode().value_counts().index
        titles = items.loc[group["item_index"], "title"].tolist()
        for sample in range(n_samples + 1):
            top = genres[:3] if sample == 0 else rng.permutation(genres[:6])[:3]
            some = titles[-3:] if sample == 0 else list(rng.choice(titles, min(3, len(titles)), replace=False))
            rows.append((int(user), sample, f"This user enjoys {', '.join(top)} movies, for example {'; '.join(some)}."))
    frame = pd.DataFrame(rows, columns=["user_index", "sample", "text"])
    out = run / "round_0" / "generate"
    out.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(out / "knowledge.parquet", index=False)
    return frame


@pytest.fixture(scope="session")
def ml100k_run(tmp_path_factory) -> Path:
    """ML-100k, all 943 users; knowledge for all but MISSING_USERS train users with lists; encoded."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("ml100k-run")
    run_data_stage(run, DataConfig(dataset="ml-100k"))
    frame = write_fixture_knowledge(run)
    users = read_protocol(run / "data").users
    train = users.loc[users["split"] == "train", "user_index"]
    drop = sorted(set(train) & set(frame["user_index"]))[:MISSING_USERS]
    frame[~frame["user_index"].isin(drop)].to_parquet(run / "round_0" / "generate" / "knowledge.parquet", index=False)
    run_encode_stage(run, 0, EncodeConfig(), progress=False)
    return run


@pytest.fixture(scope="session")
def ml100k(ml100k_run):
    return read_protocol(ml100k_run / "data"), read_embeddings(ml100k_run / "round_0" / "encode")
