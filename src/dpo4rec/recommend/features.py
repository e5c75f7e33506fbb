"""Tensors the re-rankers read, built from the data stage's tables.

* lists: candidate items (N, L), labels (N, L), recent history (N, H), owner
  user and split per list;
* item attributes: categorical columns of items.parquet (genres, year,
  brand, categories) as ids, up to ``max_values`` per column ("A|B" splits);
* user knowledge: one vector per user (the chosen sample), with a mask of the
  users that have none (they get the model's learned "unknown" vector).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from dpo4rec.errors import InputError

log = logging.getLogger(__name__)
_NOT_ATTRIBUTES = {"item_index", "item_id", "title"}


@dataclass
class ListTensors:
    """The protocol's lists as tensors (rows in lists.parquet order)."""

    items: torch.Tensor  # (N, L) int64, item_index >= 1
    labels: torch.Tensor  # (N, L) float32, 0/1
    history: torch.Tensor  # (N, H) int64, 0 = padding
    user_index: torch.Tensor  # (N,) int64
    split: np.ndarray  # (N,) str: train / validation / test

    def __len__(self) -> int:
        return int(self.items.shape[0])

    def subset(self, rows: np.ndarray) -> ListTensors:
        idx = torch.as_tensor(rows, dtype=torch.long)
        return ListTensors(self.items[idx], self.labels[idx], self.history[idx], self.user_index[idx], self.split[rows])

    def of_split(self, split: str) -> ListTensors:
        return self.subset(np.flatnonzero(self.split == split))


def list_tensors(lists: pd.DataFrame) -> ListTensors:
    """Stack the per-list arrays of lists.parquet."""
    if len(lists) == 0:
        raise InputError("lists.parquet holds no lists")
    items = np.stack(lists["items"].to_numpy()).astype(np.int64)
    labels = np.stack(lists["labels"].to_numpy()).astype(np.float32)
    history = np.stack(lists["history"].to_numpy()).astype(np.int64)
    return ListTensors(
        torch.from_numpy(items), torch.from_numpy(labels), torch.from_numpy(history),
        torch.from_numpy(lists["user_index"].to_numpy(np.int64)), lists["split"].astype(str).to_numpy(),
    )


def mark_reward_lists(lists: pd.DataFrame, fraction: float) -> pd.DataFrame:
    """Relabel each train user's last ``fraction`` of lists (at least one, by time) as split "reward".

    A recommender trained on the remaining train lists has never seen these, so
    a reward computed on them measures how a text generalizes to the user's
    next interactions instead of how well it fits lists the model memorized.
    """
    lists = lists.copy()
    train = lists["split"].astype(str) == "train"
    order = lists[train].sort_values(["user_index", "chunk"])
    position_from_end = order.groupby("user_index").cumcount(ascending=False)
    per_user = order.groupby("user_index")["chunk"].transform("size")
    held = position_from_end < np.maximum(1, np.ceil(per_user * fraction))
    lists["split"] = lists["split"].astype(object)
    lists.loc[held[held].index, "split"] = "reward"
    return lists


def attribute_columns(items: pd.DataFrame) -> list[str]:
    """Categorical item columns: everything but ids, titles and per-item identifiers."""
    columns = []
    for column in items.columns:
        if column in _NOT_ATTRIBUTES:
            continue
        values = items[column].dropna()
        if len(values) == 0 or values.astype(str).nunique() > 0.5 * len(items):
            continue  # ASINs, URLs, free text: no shared value to learn from
        columns.append(column)
    return columns


def attribute_table(items: pd.DataFrame, max_values: int = 4) -> tuple[torch.Tensor, list[str], int]:
    """``(table (n_items + 1, C, V) int64, columns, vocabulary size)``; id 0 = none/padding.

    One vocabulary over (column, value) pairs; row i is item_index i.
    """
    columns = attribute_columns(items)
    n_rows = int(items["item_index"].max()) + 1
    table = np.zeros((n_rows, max(len(columns), 1), max_values), np.int64)
    vocab: dict[tuple[str, str], int] = {}
    rows = items["item_index"].to_numpy()
    for c, column in enumerate(columns):
        for row, value in zip(rows, items[column]):
            if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
                continue
            for v, part in enumerate(str(value).split("|")[:max_values]):
                table[row, c, v] = vocab.setdefault((column, part.strip()), len(vocab) + 1)
    return torch.from_numpy(table), columns, len(vocab)


@dataclass
class UserKnowledge:
    """One knowledge vector per user_index, and who has one."""

    vectors: torch.Tensor  # (n_users, dim) float32; zero rows where unknown
    known: torch.Tensor  # (n_users,) bool

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def user_knowledge(n_users: int, user_index: np.ndarray, vectors: np.ndarray, source: str = "embeddings") -> UserKnowledge:
    """Scatter ``vectors`` (one per listed user) into a table over all ``n_users``."""
    user_index = np.asarray(user_index, dtype=np.int64)
    if len(user_index) and (user_index.min() < 0 or user_index.max() >= n_users):
        bad = int(user_index[(user_index < 0) | (user_index >= n_users)][0])
        raise InputError(f"{source}: user_index {bad} is not a user of the data stage (0..{n_users - 1}); were the embeddings made from another data run?")
    table = torch.zeros((n_users, vectors.shape[1]), dtype=torch.float32)
    known = torch.zeros(n_users, dtype=torch.bool)
    table[torch.from_numpy(user_index)] = torch.from_numpy(np.asarray(vectors, np.float32))
    known[torch.from_numpy(user_index)] = True
    return UserKnowledge(table, known)


def item_knowledge(n_rows: int, item_index: np.ndarray, vectors: np.ndarray) -> torch.Tensor:
    """``(n_items + 1, dim)`` item vectors by item_index; row 0 (padding) stays zero."""
    table = torch.zeros((n_rows, vectors.shape[1]), dtype=torch.float32)
    keep = (item_index >= 1) & (item_index < n_rows)
    table[torch.from_numpy(item_index[keep])] = torch.from_numpy(np.asarray(vectors[keep], np.float32))
    return table
