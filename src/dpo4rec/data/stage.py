"""The data stage: load a data set, apply the protocol, write ``RUN_DIR/data/``.

Files written (all parquet except the JSON):
* ``users.parquet``: user_index, user_id, split, n_interactions, n_prompt, n_lists, side info
* ``items.parquet``: item_index (1-based, 0 pads), item_id, title, text attributes
* ``interactions.parquet``: the selected users' interactions with position, label, in_prompt
* ``lists.parquet``: list_index, user_index, split, chunk, items, labels, history (empty under next_item)
* ``background.parquet`` (next_item): user_id, items: sequences that only train the recommender (data.background_users)
* ``summary.json`` and ``manifest.json``
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from dpo4rec.artifacts import StageFolder, StageResult, begin_stage, fingerprint_file, read_json, read_parquet, write_json, write_parquet
from dpo4rec.config import DataConfig, to_dict
from dpo4rec.data import load_dataset
from dpo4rec.data.next_item import build_next_item
from dpo4rec.data.protocol import ProtocolData, build_protocol, protocol_name
from dpo4rec.errors import InputError

log = logging.getLogger(__name__)
STAGE = "data"


def run_data_stage(run_dir: str | Path, config: DataConfig) -> StageResult:
    """Write the protocol artifacts to ``run_dir/data``, or reuse them if they match."""
    folder = Path(run_dir) / STAGE
    dataset = load_dataset(config.dataset, config.path)
    check_ratings(dataset, config.rating_range)
    inputs = {p.name: fingerprint_file(p) for p in dataset.source_files}
    manifest, done = begin_stage(folder, STAGE, to_dict(config), inputs)
    if done:
        return done
    protocol = (build_next_item if config.protocol == "next_item" else build_protocol)(dataset, config)
    with StageFolder(folder, manifest) as tmp:
        write_protocol(protocol, tmp)
    return StageResult(folder, protocol.summary, reused=False)


def check_ratings(dataset, rating_range: tuple[float, float] | None) -> None:
    """Refuse ratings outside a declared range; without one, warn when they look like no star scale."""
    ratings = dataset.interactions["rating"]
    known = ratings.dropna()
    if known.empty:
        return
    source = dataset.source_files[0] if dataset.source_files else dataset.name
    if rating_range is not None:
        low, high = rating_range
        outside = ratings.notna() & ((ratings < low) | (ratings > high))
        if outside.any():
            row = dataset.interactions[outside].iloc[0]
            raise InputError(f"{source}: rating {row['rating']:g} (user {row['user_id']!r}, item {row['item_id']!r}) is outside "
                             f"data.rating_range [{low:g}, {high:g}]; {int(outside.sum()):,} ratings are")
        return
    odd = [why for why, bad in (("negative", known < 0), ("above 10", known > 10), ("fractional", known != known.round())) if bad.any()]
    if odd:
        log.warning("%s: ratings run from %g to %g (%s): set data.rating_range = [lowest, highest] to check them",
                    source, known.min(), known.max(), ", ".join(odd))


def write_protocol(protocol: ProtocolData, folder: Path) -> None:
    write_parquet(folder / "users.parquet", _text_safe(protocol.users))
    write_parquet(folder / "items.parquet", _text_safe(protocol.items))
    write_parquet(folder / "interactions.parquet", protocol.interactions)
    write_parquet(folder / "lists.parquet", protocol.lists)
    if protocol.background is not None:
        write_parquet(folder / "background.parquet", protocol.background)
    write_json(folder / "summary.json", protocol.summary)


def _text_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns mixing types (ids from different sources) become strings for parquet."""
    frame = frame.copy()
    for column in frame.columns:
        if frame[column].dtype == object:
            kinds = {type(v) for v in frame[column].dropna()}
            if len(kinds) > 1:
                frame[column] = frame[column].astype("string")
    return frame


def used_items(data_dir: Path) -> np.ndarray:
    """Item indices the run's recommenders can see: under the re-rank protocol the list candidates, the histories
    beside them and the users' interactions; under next_item every item (all are candidates)."""
    if protocol_name(read_json(Path(data_dir) / "summary.json")) == "next_item":
        return read_parquet(Path(data_dir) / "items.parquet")["item_index"].to_numpy().astype(np.int64)
    lists, interactions = read_parquet(Path(data_dir) / "lists.parquet"), read_parquet(Path(data_dir) / "interactions.parquet")
    parts = [interactions["item_index"].to_numpy()]
    for column in ("items", "history"):
        if len(lists):
            parts.append(np.concatenate(lists[column].to_numpy()))
    return np.unique(np.concatenate(parts).astype(np.int64))


def read_protocol(folder: str | Path) -> ProtocolData:
    """Load what ``run_data_stage`` wrote (for later stages and tests)."""
    folder = Path(folder)
    return ProtocolData(
        users=read_parquet(folder / "users.parquet"),
        items=read_parquet(folder / "items.parquet"),
        interactions=read_parquet(folder / "interactions.parquet"),
        lists=read_parquet(folder / "lists.parquet"),
        summary=read_json(folder / "summary.json"),
        background=read_parquet(folder / "background.parquet") if (folder / "background.parquet").is_file() else None,
    )
