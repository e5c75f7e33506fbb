"""A user's own data: a folder with ``interactions.{csv,parquet}``.

Columns: ``user_id`` and ``item_id`` (integers, or any strings: ``u1``,
``A3NHUQ33CFH3VM``; ids stay as given and are mapped to dense indices by the
data stage), optional ``rating`` and ``timestamp`` (numbers). Optional ``items.{csv,parquet}`` (``item_id``,
``title`` and any text attributes) and ``users.{csv,parquet}`` (``user_id``
and side information). Without ratings every interaction is positive;
with ratings, rating > 3 is, unless the config says otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dpo4rec.data.dataset import (
    Dataset, finish_interactions, finish_items, finish_users, locate, read_table, require_columns, to_numbers,
)
from dpo4rec.errors import InputError

DEFAULT_POSITIVE_RATING = 3.0
DEFAULT_PROMPT_HISTORY_MAX = 30


def find_table(folder: Path, stem: str) -> Path | None:
    for suffix in (".parquet", ".csv"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def is_custom_folder(folder: Path) -> bool:
    return find_table(folder, "interactions") is not None


def _read(path: Path, id_columns: list[str]):
    frame = read_table(path, dtype=str, keep_default_na=False, na_values=[""], index_col=False) if path.suffix == ".csv" else read_table(path)
    header_lines = 1 if path.suffix == ".csv" else None
    require_columns(frame, id_columns, path)
    for column in id_columns:
        empty = frame[column].isna() | (frame[column].astype("string").str.strip() == "")
        if empty.any():
            raise InputError(f"{locate(path, int(np.flatnonzero(empty.to_numpy())[0]), header_lines)}: {column} is empty")
        if frame[column].dtype.kind not in "iuf":  # numbers from a parquet file stay numbers
            frame[column] = frame[column].astype(str).str.strip()
    return frame, header_lines


def _id_types(tables: list[tuple[pd.DataFrame, Path, int | None]], column: str) -> None:
    """Ids that are all integers in every table become integers; otherwise every table keeps them as strings."""
    present = [(frame, path, lines) for frame, path, lines in tables if frame is not None and column in frame.columns]

    def integers(values: pd.Series) -> bool:
        if values.dtype.kind in "iuf":
            return bool((values == np.floor(values)).all())
        return bool(values.str.fullmatch(r"[+-]?\d+").all())

    if all(integers(frame[column]) for frame, _, _ in present):
        for frame, path, lines in present:
            frame[column] = to_numbers(frame[column], column, path, lines, integer=True)
    else:
        for frame, _, _ in present:
            frame[column] = frame[column].map(lambda v: str(int(v)) if isinstance(v, float) and v == int(v) else str(v))


def load_folder(path: str | Path) -> Dataset:
    folder = Path(path)
    inter_file = find_table(folder, "interactions")
    if inter_file is None:
        raise InputError(f"{folder}: no interactions.csv or interactions.parquet")
    inter, header_lines = _read(inter_file, ["user_id", "item_id"])
    item_file, user_file = find_table(folder, "items"), find_table(folder, "users")
    items = users = None
    item_lines = user_lines = None
    if item_file is not None:
        items, item_lines = _read(item_file, ["item_id"])
        require_columns(items, ["title"], item_file)
    if user_file is not None:
        users, user_lines = _read(user_file, ["user_id"])
    _id_types([(inter, inter_file, header_lines), (items, item_file, item_lines)], "item_id")
    _id_types([(inter, inter_file, header_lines), (users, user_file, user_lines)], "user_id")
    interactions = finish_interactions(inter, inter_file, header_lines)
    has_ratings = bool(interactions["rating"].notna().any())
    return Dataset(
        name=folder.name,
        interactions=interactions,
        items=finish_items(items, interactions, item_file or inter_file),
        users=finish_users(users, user_file),
        positive_rating=DEFAULT_POSITIVE_RATING if has_ratings else None,
        prompt_history_max=DEFAULT_PROMPT_HISTORY_MAX,
        source_files=[f for f in (inter_file, item_file, user_file) if f is not None],
    )
