"""The next-item protocol: chronological leave-one-out (SASRec, Kang and McAuley 2018).

Per user, interactions in time order (ties in source order): the last item is
the test target, the one before it the validation target. The recommender
trains on the rest (recommend/sequential.py). The LLM's prompt history is the
last ``prompt_history_max`` interactions before the validation target, so no
text ever reads either target.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dpo4rec.config import DataConfig
from dpo4rec.data.dataset import Dataset
from dpo4rec.data.protocol import _BACKGROUND, SPLITS, ProtocolData, select_users, selected_tables
from dpo4rec.errors import InputError

MIN_INTERACTIONS = 3  # one input item, the validation target, the test target


def item_vocabulary(item_ids: pd.Series) -> pd.Series:
    """item_id -> item_index 1..n over the sorted distinct ids (0 stays free for padding)."""
    ids = np.sort(item_ids.unique())
    return pd.Series(np.arange(1, len(ids) + 1, dtype=np.int64), index=ids)


def item_sequences(interactions: pd.DataFrame, item_index: pd.Series) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(user_ids, sequences)``: each user's item_index sequence in the table's order (sorted by user, then time)."""
    if len(interactions) == 0:
        raise InputError("no interactions to build sequences from")
    indexed = item_index.reindex(interactions["item_id"]).to_numpy()
    users = interactions["user_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    if len(np.unique(users[starts])) != len(starts):
        raise InputError("interactions must be sorted by user (each user's rows together)")
    return users[starts], np.split(indexed.astype(np.int64), starts[1:])


def prompt_positions(n_interactions: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Per user, ``(first, end)`` positions of the prompt history: the last ``cap`` interactions before the validation target."""
    end = np.asarray(n_interactions) - 2
    return np.maximum(end - cap, 0), end


LIST_COLUMNS = ["list_index", "user_index", "split", "chunk", "items", "labels", "history"]


def build_next_item(dataset: Dataset, config: DataConfig) -> ProtocolData:
    """The data stage's tables under the next-item protocol; ``lists`` is empty (there are no re-rank lists).

    Users with fewer than 3 interactions are dropped; the subset (data.n_users) and the user split are drawn as
    for the re-rank protocol. Every interaction is positive (label 1); ``in_prompt`` marks the prompt history.
    The item vocabulary covers every interacted item of the whole data set: all of them are candidates.
    """
    cap = config.prompt_history_max or dataset.prompt_history_max
    inter = dataset.interactions
    item_index = item_vocabulary(inter["item_id"])
    counts = inter.groupby("user_id", sort=True).size()
    too_few = counts.to_numpy() < MIN_INTERACTIONS
    eligible = counts.index[~too_few]
    if len(eligible) == 0:
        raise InputError(f"{dataset.name}: no user has the {MIN_INTERACTIONS} interactions the next-item protocol needs")
    selected, split_codes = select_users(eligible.to_numpy(), config, dataset.name)
    users, chosen = selected_tables(dataset, selected, split_codes, pd.DataFrame({"n_interactions": counts}), item_index)
    first, end = prompt_positions(users["n_interactions"].to_numpy(), cap)  # by user_index
    users.insert(users.columns.get_loc("n_interactions") + 1, "n_prompt", end - first)
    position, owner = chosen["position"].to_numpy(), chosen["user_index"].to_numpy()
    chosen["in_prompt"] = (position >= first[owner]) & (position < end[owner])
    chosen["label"] = np.ones(len(chosen), dtype=np.int8)
    background = background_sequences(inter, item_index, np.setdiff1d(eligible.to_numpy(), selected), config)
    items = dataset.items[dataset.items["item_id"].isin(item_index.index)].copy()
    items.insert(0, "item_index", item_index.reindex(items["item_id"]).to_numpy())
    items = items.sort_values("item_index").reset_index(drop=True)
    summary = {
        "dataset": dataset.name,
        "loaded": dataset.summary(),
        "protocol": {"name": "next_item", "prompt_history_max": int(cap), "seed": config.seed,
                     "targets": "last item = test, second-to-last = validation, per user in time order"},
        "users": {"loaded": int(len(counts)), f"dropped_fewer_than_{MIN_INTERACTIONS}_interactions": int(too_few.sum()),
                  "eligible": int(len(eligible)), "selected": int(len(users)), "background": int(len(background)),
                  **{split: int((users["split"] == split).sum()) for split in SPLITS}},
        "items": int(len(item_index)),
        "items_of_selected_users": int(chosen["item_index"].nunique()),
        "prompt_history_mean_length": float(users["n_prompt"].mean()),
    }
    interactions = chosen[["user_index", "item_index", "rating", "timestamp", "position", "label", "in_prompt"]].reset_index(drop=True)
    return ProtocolData(users=users, items=items, interactions=interactions, lists=pd.DataFrame(columns=LIST_COLUMNS), summary=summary,
                        background=background)


def background_sequences(inter: pd.DataFrame, item_index: pd.Series, others: np.ndarray, config: DataConfig) -> pd.DataFrame:
    """``user_id``, ``items``: the sequences of ``data.background_users`` of the unselected eligible users (seeded)."""
    count = len(others) if config.background_users is None else config.background_users
    if count > len(others):
        raise InputError(f"data.background_users = {count}, but only {len(others)} eligible users are outside data.n_users")
    if count < len(others):
        others = np.sort(np.random.default_rng([config.seed, _BACKGROUND]).choice(others, count, replace=False))
    rows = inter[inter["user_id"].isin(others)]
    user_ids, sequences = item_sequences(rows, item_index) if len(rows) else (np.array([]), [])
    return pd.DataFrame({"user_id": user_ids, "items": [s.astype(np.int32) for s in sequences]})


def run_sequences(interactions: pd.DataFrame, n_users: int) -> list[np.ndarray]:
    """Per user_index, the item_index sequence in time order, from the data stage's interactions.parquet."""
    ordered = interactions.sort_values(["user_index", "position"], kind="stable")
    owner = ordered["user_index"].to_numpy()
    bounds = np.searchsorted(owner, np.arange(n_users + 1))
    items = ordered["item_index"].to_numpy().astype(np.int64)
    return [items[bounds[u] : bounds[u + 1]] for u in range(n_users)]
