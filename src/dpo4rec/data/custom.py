"""A user's own data: a folder with ``interactions.{csv,parquet}``.

Columns: ``user_id`` and ``item_id`` (integers), optional ``rating`` and
``timestamp`` (numbers). Optional ``items.{csv,parquet}`` (``item_id``,
``title`` and any text attributes) and ``users.{csv,parquet}`` (``user_id``
and side information). Without ratings every interaction is positive;
with ratings, rating > 3 is, unless the config says otherwise.
"""

from __future__ import annotations

from pathlib import Path

from dpo4rec.data.dataset import (
    Dataset, finish_interactions, finish_items, finish_users, read_table, require_columns, to_numbers,
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
        frame[column] = to_numbers(frame[column], column, path, header_lines, integer=True)
    return frame, header_lines


def load_folder(path: str | Path) -> Dataset:
    folder = Path(path)
    inter_file = find_table(folder, "interactions")
    if inter_file is None:
        raise InputError(f"{folder}: no interactions.csv or interactions.parquet")
    inter, header_lines = _read(inter_file, ["user_id", "item_id"])
    interactions = finish_interactions(inter, inter_file, header_lines)

    item_file, user_file = find_table(folder, "items"), find_table(folder, "users")
    items = users = None
    if item_file is not None:
        items, _ = _read(item_file, ["item_id"])
        require_columns(items, ["title"], item_file)
    if user_file is not None:
        users, _ = _read(user_file, ["user_id"])
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
