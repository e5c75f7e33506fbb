"""Data sets behind one entry point, and the re-rank protocol as a stage."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dpo4rec.data.amazon import is_amazon_folder, load_amazon_beauty
from dpo4rec.data.custom import is_custom_folder, load_folder
from dpo4rec.data.dataset import Dataset
from dpo4rec.data.movielens import load_ml1m, load_ml100k
from dpo4rec.errors import InputError

LOADERS: dict[str, Callable[[str | Path | None], Dataset]] = {
    "ml-1m": load_ml1m,
    "ml-100k": load_ml100k,
    "amazon-beauty": load_amazon_beauty,
}


def register_loader(name: str, loader: Callable[[str | Path | None], Dataset]) -> None:
    """Add a named data set; ``loader(path)`` returns a ``Dataset``."""
    LOADERS[name] = loader


def load_dataset(name_or_path: str | Path, path: str | Path | None = None) -> Dataset:
    """Load a data set by name (``ml-1m``, ``ml-100k``, ``amazon-beauty``) or folder.

    A folder is recognized by its files: ``ratings.dat`` or ``ml-1m.inter``
    (ML-1M), ``ml-100k.inter``, ``sequences.txt`` or ``reviews_Beauty_5.json.gz``
    (Amazon-Beauty), ``interactions.{csv,parquet}`` (a user's own data).
    """
    key = str(name_or_path)
    if key in LOADERS:
        return LOADERS[key](path)
    folder = Path(name_or_path)
    if folder.is_dir():
        if (folder / "ratings.dat").is_file() or (folder / "ml-1m.inter").is_file():
            return load_ml1m(folder)
        if (folder / "ml-100k.inter").is_file():
            return load_ml100k(folder)
        if is_amazon_folder(folder):
            return load_amazon_beauty(folder)
        if is_custom_folder(folder):
            return load_folder(folder)
        raise InputError(
            f"{folder}: no data set files recognized (expected interactions.csv/.parquet, "
            "sequences.txt, ratings.dat or a RecBole .inter file)"
        )
    if any(sep in key for sep in ("/", "\\")) or key.startswith("."):
        raise InputError(f"folder not found: {key}")
    raise InputError(f"unknown dataset {key!r} (known: {', '.join(LOADERS)}; or give a folder)")


__all__ = ["Dataset", "load_dataset", "register_loader", "LOADERS"]
