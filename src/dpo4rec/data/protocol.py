"""The re-ranking protocol of KAR / DPO4Rec (see DESIGN.md, "Protocol").

Per user, interactions in time order:
* prompt history = the first ``min((n + 1) // 2, cap)`` interactions; only
  these reach the LLM;
* after it, chunks of ``positives_per_list`` consecutive interactions; each
  chunk plus negatives (items the user never interacted with) makes one list,
  shuffled; an incomplete last chunk is dropped;
* each list also carries the ``recent_history`` interactions before it.
Users are split at random into train / validation / test.

All randomness is seeded per purpose, and per user for the lists, so a user's
lists do not change when the subset or the split changes.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dpo4rec.config import DataConfig
from dpo4rec.data.dataset import Dataset
from dpo4rec.errors import InputError

SPLITS = ("train", "validation", "test")
# Distinct streams so that, say, changing n_users leaves each user's lists alone.
_SUBSET, _SPLIT, _LISTS, _BACKGROUND = 0, 1, 2, 3


@dataclass
class ProtocolData:
    """What the data stage writes: the tables every later stage reads."""

    users: pd.DataFrame  # user_index, user_id, split, n_interactions, n_prompt, n_lists, side info
    items: pd.DataFrame  # item_index (1-based; 0 pads), item_id, title, attributes
    interactions: pd.DataFrame  # selected users: user_index, item_index, rating, timestamp, position, label, in_prompt
    lists: pd.DataFrame  # list_index, user_index, split, chunk, items, labels, history
    summary: dict
    background: pd.DataFrame | None = None  # next_item: user_id, items (item_index sequence) of users who only train the recommender


def prompt_history_length(n_interactions: np.ndarray | int, cap: int) -> np.ndarray:
    """``min((n + 1) // 2, cap)``: the share of a history the LLM may read."""
    return np.minimum((np.asarray(n_interactions) + 1) // 2, cap)


def resolve_positive_rating(config: DataConfig, dataset: Dataset) -> float | None:
    """The label rule in force: rating > threshold, or None for all positive."""
    if config.positive_rating == "all":
        return None
    if config.positive_rating == "auto":
        return dataset.positive_rating
    if not dataset.interactions["rating"].notna().any():
        raise InputError(f"data.positive_rating={config.positive_rating} but {dataset.name} has no ratings")
    return float(config.positive_rating)


def split_users(n_users: int, fractions: tuple[float, float, float], seed: int) -> np.ndarray:
    """Seeded assignment of ``n_users`` to train/validation/test (codes 0/1/2).

    Validation and test get at least one user each whenever there are three.
    """
    n_val = int(round(fractions[1] * n_users))
    n_test = int(round(fractions[2] * n_users))
    if n_users >= 3:
        n_val, n_test = max(n_val, 1), max(n_test, 1)
    n_train = n_users - n_val - n_test
    codes = np.repeat(np.array([0, 1, 2], dtype=np.int8), [n_train, n_val, n_test])
    return np.random.default_rng([seed, _SPLIT]).permutation(codes)


def select_users(eligible: np.ndarray, config: DataConfig, dataset_name: str) -> tuple[np.ndarray, np.ndarray]:
    """The seeded subset of ``data.n_users`` eligible users (all when unset), and their split codes."""
    selected = eligible
    if config.n_users is not None:
        if config.n_users > len(selected):
            raise InputError(f"data.n_users={config.n_users} but only {len(selected)} users of {dataset_name} are eligible")
        pick = np.random.default_rng([config.seed, _SUBSET]).choice(len(selected), config.n_users, replace=False)
        selected = selected[np.sort(pick)]
    return selected, split_users(len(selected), config.split, config.seed)


def selected_tables(dataset: Dataset, selected: np.ndarray, split_codes: np.ndarray, per_user: pd.DataFrame,
                    item_index: pd.Series) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(users, interactions)`` of the selected users: user_index in selection order, split, the ``per_user``
    columns and side information; their interactions with user_index, item_index and position (in time order)."""
    users = pd.DataFrame({"user_index": np.arange(len(selected), dtype=np.int32), "user_id": selected})
    users["split"] = pd.Categorical.from_codes(split_codes, SPLITS)
    users = users.join(per_user, on="user_id")
    if dataset.users is not None:
        users = users.merge(dataset.users, on="user_id", how="left")
    chosen = dataset.interactions[dataset.interactions["user_id"].isin(selected)].copy()
    chosen["user_index"] = chosen["user_id"].map(pd.Series(users["user_index"].to_numpy(), index=users["user_id"])).astype(np.int32)
    chosen["item_index"] = item_index.reindex(chosen["item_id"]).to_numpy()
    chosen["position"] = chosen.groupby("user_index").cumcount().astype(np.int32)
    return users, chosen


def protocol_name(summary: dict) -> str:
    """The protocol a data stage applied, from its summary.json (data folders older than data.protocol: rerank)."""
    return summary.get("protocol", {}).get("name", "rerank")


def _user_stream(seed: int, user_id) -> np.random.Generator:
    return np.random.default_rng([seed, _LISTS, zlib.crc32(str(user_id).encode())])


def sample_negatives(rng: np.random.Generator, allowed: np.ndarray, n_lists: int, k: int) -> np.ndarray:
    """``(n_lists, k)`` items from ``allowed``, distinct within each row."""
    if len(allowed) < k:
        raise InputError(f"only {len(allowed)} items are left to sample {k} negatives from; the catalog is too small")
    picks = allowed[rng.integers(0, len(allowed), size=(n_lists, k))]
    ordered = np.sort(picks, axis=1)
    repeats = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
    for row in np.flatnonzero(repeats):  # rare when the catalog is large
        picks[row] = rng.choice(allowed, size=k, replace=False)
    return picks


def build_protocol(dataset: Dataset, config: DataConfig) -> ProtocolData:
    """Apply the re-rank protocol to a loaded data set (data/next_item.py builds the other)."""
    cap = config.prompt_history_max or dataset.prompt_history_max
    threshold = resolve_positive_rating(config, dataset)
    chunk, n_neg, recent = config.positives_per_list, config.list_size - config.positives_per_list, config.recent_history

    inter = dataset.interactions
    # Vocabulary over every interacted item of the whole data set: indices do not
    # depend on the user subset, and 0 stays free for padding.
    item_ids = np.sort(inter["item_id"].unique())
    item_index = pd.Series(np.arange(1, len(item_ids) + 1, dtype=np.int32), index=item_ids)

    counts = inter.groupby("user_id", sort=True).size()
    n_prompt = prompt_history_length(counts.to_numpy(), cap)
    n_lists = (counts.to_numpy() - n_prompt) // chunk
    too_few = counts.to_numpy() < 2
    no_list = ~too_few & (n_lists == 0)
    eligible = counts.index[~too_few & ~no_list]
    if len(eligible) == 0:
        raise InputError(f"{dataset.name}: no user has enough interactions for one list of {chunk} after the prompt history")

    selected, split_codes = select_users(eligible.to_numpy(), config, dataset.name)

    per_user = pd.DataFrame({"n_interactions": counts, "n_prompt": n_prompt, "n_lists": n_lists}, index=counts.index)
    users, chosen = selected_tables(dataset, selected, split_codes, per_user, item_index)
    chosen["in_prompt"] = chosen["position"].to_numpy() < chosen["user_index"].map(users["n_prompt"]).to_numpy()
    if threshold is None:
        chosen["label"] = np.ones(len(chosen), dtype=np.int8)
    else:
        chosen["label"] = (chosen["rating"] > threshold).astype(np.int8)

    lists = _build_lists(chosen, users, item_index, chunk, n_neg, recent, config.seed)
    items = dataset.items[dataset.items["item_id"].isin(item_ids)].copy()
    items.insert(0, "item_index", item_index.reindex(items["item_id"]).to_numpy())
    items = items.sort_values("item_index").reset_index(drop=True)

    summary = _summary(dataset, config, cap, threshold, counts, too_few, no_list, eligible, users, lists, chosen)
    interactions = chosen[["user_index", "item_index", "rating", "timestamp", "position", "label", "in_prompt"]].reset_index(drop=True)
    return ProtocolData(users=users, items=items, interactions=interactions, lists=lists, summary=summary)


def _build_lists(chosen, users, item_index, chunk, n_neg, recent, seed) -> pd.DataFrame:
    all_items = item_index.to_numpy()
    # chosen is sorted by user, and user_index follows the same order: slice by offsets.
    item_seq, label_seq = chosen["item_index"].to_numpy(), chosen["label"].to_numpy()
    ends = np.cumsum(users["n_interactions"].to_numpy())
    untouched = np.ones(len(all_items) + 1, dtype=bool)  # by item index; reset after each user
    rows_items, rows_labels, rows_history, rows_user, rows_chunk = [], [], [], [], []
    for user in users.itertuples(index=False):
        seq = item_seq[ends[user.user_index] - user.n_interactions : ends[user.user_index]]
        labels = label_seq[ends[user.user_index] - user.n_interactions : ends[user.user_index]]
        rng = _user_stream(seed, user.user_id)
        k = user.n_lists
        starts = user.n_prompt + chunk * np.arange(k)  # (k,)
        pos_idx = starts[:, None] + np.arange(chunk)  # (k, chunk)
        untouched[seq] = False
        allowed = all_items[untouched[all_items]]
        untouched[seq] = True
        negatives = sample_negatives(rng, allowed, k, n_neg)  # (k, n_neg)
        candidates = np.concatenate([seq[pos_idx], negatives], axis=1)  # (k, L)
        cand_labels = np.concatenate([labels[pos_idx], np.zeros((k, n_neg), np.int8)], axis=1)
        order = np.argsort(rng.random(candidates.shape), axis=1)  # a seeded shuffle per list
        candidates = np.take_along_axis(candidates, order, axis=1)
        cand_labels = np.take_along_axis(cand_labels, order, axis=1)
        hist_idx = starts[:, None] - recent + np.arange(recent)  # (k, recent), left-padded
        padded = np.concatenate([np.zeros(recent, seq.dtype), seq])
        history = padded[hist_idx + recent]
        rows_items.append(candidates)
        rows_labels.append(cand_labels)
        rows_history.append(history)
        rows_user.append(np.full(k, user.user_index, np.int32))
        rows_chunk.append(np.arange(k, dtype=np.int32))
    user_col = np.concatenate(rows_user)
    lists = pd.DataFrame({
        "list_index": np.arange(len(user_col), dtype=np.int64),
        "user_index": user_col,
        "chunk": np.concatenate(rows_chunk),
        "items": list(np.concatenate(rows_items).astype(np.int32)),
        "labels": list(np.concatenate(rows_labels).astype(np.int8)),
        "history": list(np.concatenate(rows_history).astype(np.int32)),
    })
    lists.insert(2, "split", users["split"].to_numpy()[user_col])
    return lists


def _summary(dataset, config, cap, threshold, counts, too_few, no_list, eligible, users, lists, chosen) -> dict:
    positives = np.stack(lists["labels"].to_numpy()).sum(axis=1) if len(lists) else np.zeros(0)
    return {
        "dataset": dataset.name,
        "loaded": dataset.summary(),
        "protocol": {
            "name": "rerank",
            "prompt_history_max": int(cap),
            "positives_per_list": config.positives_per_list,
            "list_size": config.list_size,
            "recent_history": config.recent_history,
            "positive_rating": threshold,
            "seed": config.seed,
        },
        "users": {
            "loaded": int(len(counts)),
            "dropped_fewer_than_2_interactions": int(too_few.sum()),
            "dropped_no_complete_list": int(no_list.sum()),
            "eligible": int(len(eligible)),
            "selected": int(len(users)),
            **{split: int((users["split"] == split).sum()) for split in SPLITS},
        },
        "lists": {
            "total": int(len(lists)),
            **{split: int((lists["split"] == split).sum()) for split in SPLITS},
            "mean_positives_per_list": float(positives.mean()) if len(positives) else 0.0,
            "lists_without_positive": int((positives == 0).sum()),
        },
        "items": int(len(np.unique(chosen["item_index"]))),
        "prompt_history_mean_length": float(users["n_prompt"].mean()),
    }
