"""Amazon Beauty (McAuley et al., SIGIR 2015 / He & McAuley, WWW 2016), 5-core.

Two folder formats:
* the processed one in ``shared/data/amazon-beauty``: ``sequences.txt`` (one user
  a line, items in time order) and ``items.csv`` (``item_id,asin,title,attributes``);
  no ratings, no timestamps, so the line order is the time order;
* the original files ``reviews_Beauty_5.json.gz`` and ``meta_Beauty.json.gz``
  (ratings and day-resolution timestamps; meta lines are Python literals).
Every interaction is positive, as in the sequential-recommendation papers.
"""

from __future__ import annotations

import ast
import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd

from dpo4rec.data.dataset import Dataset, finish_interactions, finish_items, read_table, require_columns, to_numbers
from dpo4rec.errors import InputError

PROMPT_HISTORY_MAX = 15
SEQUENCES, ITEMS = "sequences.txt", "items.csv"
REVIEWS, META = "reviews_Beauty_5.json.gz", "meta_Beauty.json.gz"


def is_amazon_folder(folder: Path) -> bool:
    return (folder / SEQUENCES).is_file() or (folder / REVIEWS).is_file()


def load_amazon_beauty(path: str | Path | None = None) -> Dataset:
    if path is None:
        raise InputError(
            "amazon-beauty needs --path (data.path in a config): a folder with sequences.txt + items.csv, "
            "or with reviews_Beauty_5.json.gz + meta_Beauty.json.gz"
        )
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"folder not found: {folder}")
    if (folder / SEQUENCES).is_file():
        return _load_processed(folder)
    if (folder / REVIEWS).is_file():
        return _load_mcauley(folder)
    raise InputError(f"{folder}: no {SEQUENCES} and no {REVIEWS}; not an Amazon-Beauty folder")


def _load_processed(folder: Path) -> Dataset:
    seq_file, item_file = folder / SEQUENCES, folder / ITEMS
    users, items = [], []
    with open(seq_file, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if not all(x.isdigit() for x in fields):
                bad = next(x for x in fields if not x.isdigit())
                raise InputError(f"{seq_file}: line {line_no}: id {bad!r} is not an integer")
            users.extend([int(fields[0])] * (len(fields) - 1))
            items.extend(int(x) for x in fields[1:])
    inter = pd.DataFrame({"user_id": np.array(users, dtype=np.int64), "item_id": np.array(items, dtype=np.int64)})
    # Rows are not lines here, so a duplicate is reported by row of the flattened file.
    interactions = finish_interactions(inter, seq_file, None)
    item_table = None
    if item_file.is_file():
        raw = read_table(item_file, dtype=str, keep_default_na=False, na_values=[""], index_col=False)
        require_columns(raw, ["item_id", "title"], item_file)
        raw["item_id"] = to_numbers(raw["item_id"], "item_id", item_file, 1, integer=True)
        item_table = _with_brand_and_categories(raw)
    return Dataset(
        name="amazon-beauty",
        interactions=interactions,
        items=finish_items(item_table, interactions, item_file),
        users=None,
        positive_rating=None,
        prompt_history_max=PROMPT_HISTORY_MAX,
        source_files=[seq_file] + ([item_file] if item_file.is_file() else []),
    )


def _with_brand_and_categories(items: pd.DataFrame) -> pd.DataFrame:
    """Split ``attributes`` ("Brand|Category|Sub|...") into brand and categories.

    The brand is first only where known, so a first token that also appears as
    a category anywhere is a category, and "Unknown" is no brand.
    """
    if "attributes" not in items.columns:
        return items
    parts = items["attributes"].fillna("").str.split("|")
    categories_seen = {token for tokens in parts for token in tokens[1:] if token}
    first = parts.str[0].fillna("")
    has_brand = ~first.isin(categories_seen | {"", "Unknown"})
    items = items.copy()
    items["brand"] = first.where(has_brand)
    items["categories"] = [
        " > ".join(t for t in (tokens[1:] if brand else tokens) if t and t != "Unknown")
        for tokens, brand in zip(parts, has_brand)
    ]
    return items


def _read_gz_records(path: Path) -> list[dict]:
    records = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    try:  # the 2014 meta files hold Python dict literals, not JSON
                        records.append(ast.literal_eval(line))
                    except (ValueError, SyntaxError):
                        raise InputError(f"{path}: line {line_no}: neither JSON nor a Python literal") from None
    except (OSError, EOFError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None
    return records


def _load_mcauley(folder: Path) -> Dataset:
    review_file, meta_file = folder / REVIEWS, folder / META
    reviews = pd.DataFrame(_read_gz_records(review_file))
    require_columns(reviews, ["reviewerID", "asin"], review_file)
    inter = pd.DataFrame({
        "user_id": reviews["reviewerID"].astype(str),
        "item_id": reviews["asin"].astype(str),
        "rating": reviews.get("overall"),
        "timestamp": reviews.get("unixReviewTime"),
    })
    interactions = finish_interactions(inter, review_file, 0)
    item_table = None
    if meta_file.is_file():
        meta = pd.DataFrame(_read_gz_records(meta_file))
        require_columns(meta, ["asin"], meta_file)
        meta = meta.drop_duplicates("asin")
        categories = meta.get("categories", pd.Series([[]] * len(meta), index=meta.index))
        item_table = pd.DataFrame({
            "item_id": meta["asin"].astype(str),
            "title": meta.get("title"),
            "brand": meta.get("brand"),
            "categories": [" > ".join(c[0]) if isinstance(c, list) and c and isinstance(c[0], list) else "" for c in categories],
            "price": pd.to_numeric(meta.get("price"), errors="coerce"),
        })
        item_table = item_table[item_table["item_id"].isin(interactions["item_id"])]
    return Dataset(
        name="amazon-beauty",
        interactions=interactions,
        items=finish_items(item_table, interactions, meta_file),
        users=None,
        positive_rating=None,
        prompt_history_max=PROMPT_HISTORY_MAX,
        source_files=[review_file] + ([meta_file] if meta_file.is_file() else []),
    )
