"""The common shape of every data set, and the checks every loader goes through."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dpo4rec.errors import InputError

log = logging.getLogger(__name__)

INTERACTION_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]


@dataclass
class Dataset:
    """Interactions, item texts and user side information of one data set.

    ``interactions`` has one row per interaction (``user_id``, ``item_id``,
    ``rating``, ``timestamp``; NaN where the source has none), sorted by user
    then time, ties in source order. ``items`` has ``item_id``, ``title`` and
    whatever text attributes the source has. ``users`` has ``user_id`` and
    side information, or is None.
    """

    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame | None
    positive_rating: float | None
    """Default label rule: rating > this is positive; None = every interaction is."""
    prompt_history_max: int
    """Default cap on the prompt history (30 for MovieLens, 15 for Amazon)."""
    source_files: list[Path] = field(default_factory=list)

    def summary(self) -> dict:
        inter = self.interactions
        return {
            "dataset": self.name,
            "users": int(inter["user_id"].nunique()),
            "items": int(inter["item_id"].nunique()),
            "interactions": len(inter),
            "items_in_item_table": len(self.items),
            "has_ratings": bool(inter["rating"].notna().any()),
            "has_timestamps": bool(inter["timestamp"].notna().any()),
        }


def locate(file: Path | str, row: int, header_lines: int | None) -> str:
    """Where row ``row`` (0-based, in file order) of a table came from."""
    if header_lines is None:
        return f"{file}: row {row + 1}"
    return f"{file}: line {row + 1 + header_lines}"


def require_columns(frame: pd.DataFrame, columns: list[str], file: Path | str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(f"{file}: missing column {missing[0]!r} (found: {', '.join(map(str, frame.columns))})")


def to_numbers(values: pd.Series, column: str, file: Path | str, header_lines: int | None, integer: bool = False) -> pd.Series:
    """Parse a column as numbers; the first non-numeric entry is an error naming its line."""
    parsed = pd.to_numeric(values, errors="coerce")
    given = values.notna() & (values.astype("string").str.strip() != "")
    bad = given & parsed.isna()
    if integer:
        bad |= given & parsed.notna() & (parsed != np.floor(parsed))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        kind = "an integer" if integer else "a number"
        raise InputError(f"{locate(file, row, header_lines)}: {column} {values.iloc[row]!r} is not {kind}")
    if integer:
        if (~given).any():
            row = int(np.flatnonzero((~given).to_numpy())[0])
            raise InputError(f"{locate(file, row, header_lines)}: {column} is empty")
        return parsed.astype("int64")
    return parsed.astype("float64")


def finish_interactions(frame: pd.DataFrame, file: Path | str, header_lines: int | None) -> pd.DataFrame:
    """Check and order an interaction table already holding ids of one type.

    Adds NaN ``rating``/``timestamp`` where absent, rejects non-numeric values
    and exact duplicate rows, and sorts by user then time (stable).
    """
    require_columns(frame, ["user_id", "item_id"], file)
    frame = frame.reset_index(drop=True)
    for column in ("user_id", "item_id"):
        empty = frame[column].isna()
        if empty.any():
            raise InputError(f"{locate(file, int(np.flatnonzero(empty.to_numpy())[0]), header_lines)}: {column} is empty")
    out = pd.DataFrame({"user_id": frame["user_id"], "item_id": frame["item_id"]})
    for column in ("rating", "timestamp"):
        if column in frame.columns and frame[column].dtype.kind not in "fiu":
            out[column] = to_numbers(frame[column], column, file, header_lines)
        elif column in frame.columns:
            out[column] = frame[column].astype("float64")
        else:
            out[column] = np.nan
    duplicated = out.duplicated(keep="first")
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        group = out.groupby(list(out.columns), dropna=False, sort=False).ngroup().to_numpy()
        first = int(np.flatnonzero(group == group[row])[0])
        where = locate(file, first, header_lines).rsplit(": ", 1)[-1]
        raise InputError(
            f"{locate(file, row, header_lines)}: duplicated interaction "
            f"(user {out.at[row, 'user_id']!r}, item {out.at[row, 'item_id']!r}), same as {where}"
        )
    # lexsort on (user, time, source row) is stable by construction: ties keep source order.
    out["_row"] = np.arange(len(out))
    out = out.sort_values(["user_id", "timestamp", "_row"], kind="stable", na_position="last")
    return out.drop(columns="_row").reset_index(drop=True)


def finish_items(items: pd.DataFrame | None, interactions: pd.DataFrame, file: Path | str) -> pd.DataFrame:
    """Make sure every interacted item has a row; titles fall back to the id."""
    if items is None:
        ids = interactions["item_id"].drop_duplicates().sort_values()
        return pd.DataFrame({"item_id": ids.to_numpy(), "title": ids.astype(str).to_numpy()})
    require_columns(items, ["item_id", "title"], file)
    duplicated = items["item_id"].duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise InputError(f"{file}: item_id {items['item_id'].iloc[row]!r} appears twice")
    items = items.reset_index(drop=True)
    missing = pd.Index(interactions["item_id"].unique()).difference(pd.Index(items["item_id"]))
    if len(missing):
        log.warning("%s: %d interacted items have no row; their title is their id", file, len(missing))
        extra = pd.DataFrame({"item_id": missing.to_numpy(), "title": missing.astype(str).to_numpy()})
        items = pd.concat([items, extra], ignore_index=True)
    items["title"] = items["title"].fillna(items["item_id"].astype(str)).astype(str)
    return items


def finish_users(users: pd.DataFrame | None, file: Path | str) -> pd.DataFrame | None:
    if users is None:
        return None
    require_columns(users, ["user_id"], file)
    duplicated = users["user_id"].duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise InputError(f"{file}: user_id {users['user_id'].iloc[row]!r} appears twice")
    return users.reset_index(drop=True)


def read_table(path: Path, **csv_options) -> pd.DataFrame:
    """Read a CSV or parquet file; any parse failure is one line naming the file."""
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        with warnings.catch_warnings():
            # pandas only warns (and drops fields) when a row is longer than the header
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(path, **csv_options)
    except pd.errors.ParserWarning:
        raise InputError(f"{path}: cannot read (some rows have more fields than the header)") from None
    except FileNotFoundError:
        raise InputError(f"file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, OSError) as exc:
        message = " ".join(str(exc).split())
        raise InputError(f"{path}: cannot read ({message})") from None
