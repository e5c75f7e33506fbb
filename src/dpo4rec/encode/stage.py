"""The encode stage: knowledge texts and item texts to vectors.

Reads ``RUN/round_<t>/generate/knowledge.parquet`` (user_index, sample,
text; sample 0 = the greedy text) and ``RUN/data/items.parquet``; writes
``RUN/round_<t>/encode/``:

* ``users.safetensors``: ``user_index`` int64 (n,), ``sample`` int64 (n,),
  ``vectors`` float32 (n, dim), rows sorted by (user_index, sample);
* ``items.safetensors``: ``item_index`` int64 (m,), ``vectors`` float32 (m, dim);
* ``summary.json`` and ``manifest.json`` (encoder name, dimension,
  max_seq_length, how many texts were longer than it and what was done).

Item text = title plus the item's attributes (and, when the generation stage
wrote ``item_knowledge.parquet`` with item_index, text, that text too).
Vectors are cached per text hash under ``RUN/cache/encode/`` so identical
texts are encoded once across rounds and a crash keeps finished batches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.numpy import save

from dpo4rec.artifacts import (
    StageFolder, StageResult, begin_stage, fingerprint_file, read_json, read_parquet, read_safetensors, round_dir, write_bytes_atomic, write_json,
)
from dpo4rec.config import EncodeConfig, to_dict
from dpo4rec.data.stage import used_items
from dpo4rec.encode.cache import EmbeddingCache, cache_key, text_hash
from dpo4rec.encode.encoder import TextEncoder
from dpo4rec.errors import InputError

log = logging.getLogger(__name__)
PLAIN_ITEMS = "items_plain.safetensors"  # item vectors without the LLM's item texts (written only when the run has them)
STAGE = "encode"
_FLUSH = 2048  # texts per cache shard: the most a crash can lose



@dataclass
class Embeddings:
    """What the encode stage wrote, in memory."""

    user_index: np.ndarray  # (n,) int64
    sample: np.ndarray  # (n,) int64
    user_vectors: np.ndarray  # (n, dim) float32
    item_index: np.ndarray  # (m,) int64
    item_vectors: np.ndarray  # (m, dim) float32
    encoder: str

    @property
    def dim(self) -> int:
        return int(self.user_vectors.shape[1])

    def for_sample(self, sample: int) -> tuple[np.ndarray, np.ndarray]:
        """``(user_index, vectors)`` of one sample (0 = greedy) for every user that has it."""
        rows = self.sample == sample
        return self.user_index[rows], self.user_vectors[rows]


def run_encode_stage(run_dir: str | Path, round_index: int, config: EncodeConfig, progress: bool = True) -> StageResult:
    """Encode round ``round_index``'s knowledge and the item texts, or reuse them."""
    run_dir = Path(run_dir)
    knowledge_path = round_dir(run_dir, round_index) / "generate" / "knowledge.parquet"
    items_path = run_dir / "data" / "items.parquet"
    lists_path, interactions_path = run_dir / "data" / "lists.parquet", run_dir / "data" / "interactions.parquet"
    item_knowledge_path = round_dir(run_dir, 0) / "generate" / "item_knowledge.parquet"  # generated once, in round 0
    for path in (knowledge_path, items_path, lists_path, interactions_path):
        if not path.is_file():
            raise InputError(f"{path} not found; run the {'generate' if path == knowledge_path else 'data'} stage first")
    inputs = {"knowledge.parquet": fingerprint_file(knowledge_path), "items.parquet": fingerprint_file(items_path),
              "lists.parquet": fingerprint_file(lists_path), "interactions.parquet": fingerprint_file(interactions_path)}
    if item_knowledge_path.is_file():
        inputs["item_knowledge.parquet"] = fingerprint_file(item_knowledge_path)
    settings = {k: v for k, v in to_dict(config).items() if k not in ("device", "batch_size")}  # neither changes a vector
    folder = round_dir(run_dir, round_index) / "encode"
    manifest, done = begin_stage(folder, STAGE, {**settings, "round": round_index}, inputs)
    if done:
        return done

    knowledge = read_knowledge(knowledge_path)
    items = read_parquet(items_path)
    used = used_items(run_dir / "data")
    encoded = items["item_index"].isin(used).to_numpy()  # a data set's other items are never scored in this run
    item_knowledge = read_item_knowledge(item_knowledge_path) if item_knowledge_path.is_file() else None
    texts = item_texts(items[encoded], item_knowledge)
    encoder = TextEncoder(config.encoder, config.batch_size, config.device, config.long_texts)
    cache = EmbeddingCache(run_dir / "cache" / "encode" / cache_key(encoder.name, config.long_texts), encoder.dim, encoder.name)
    user_vectors, user_long = encode_cached(encoder, cache, knowledge["text"].tolist(), progress)
    encoded_vectors, item_long = encode_cached(encoder, cache, texts, progress)
    item_vectors = np.zeros((len(items), encoder.dim), dtype=np.float32)
    item_vectors[encoded] = encoded_vectors
    plain_vectors = None
    if item_knowledge is not None:  # also without the LLM's item texts: the arm that measures what they add
        plain_vectors = np.zeros_like(item_vectors)
        plain_vectors[encoded], _ = encode_cached(encoder, cache, item_texts(items[encoded]), progress)

    summary = {
        "encoder": encoder.name,
        "dim": encoder.dim,
        "max_seq_length": encoder.max_tokens,
        "users": int(knowledge["user_index"].nunique()),
        "user_texts": len(knowledge),
        "samples_per_user": int(knowledge.groupby("user_index").size().max()),
        "items": len(items),
        "items_encoded": int(encoded.sum()),
        "item_knowledge_texts": 0 if item_knowledge is None else int(items[encoded]["item_index"].isin(item_knowledge["item_index"]).sum()),
        "long_texts": {"policy": config.long_texts, "user_texts": user_long, "item_texts": item_long},
    }
    manifest["encoder"] = {k: summary[k] for k in ("encoder", "dim", "max_seq_length")}
    manifest["long_texts"] = summary["long_texts"]
    with StageFolder(folder, manifest) as tmp:
        write_bytes_atomic(tmp / "users.safetensors", save({
            "user_index": knowledge["user_index"].to_numpy(np.int64),
            "sample": knowledge["sample"].to_numpy(np.int64),
            "vectors": user_vectors,
        }, metadata={"encoder": encoder.name}))
        for name, vectors in (("items.safetensors", item_vectors), (PLAIN_ITEMS, plain_vectors)):
            if vectors is not None:
                write_bytes_atomic(tmp / name, save({"item_index": items["item_index"].to_numpy(np.int64), "vectors": vectors},
                                                    metadata={"encoder": encoder.name}))
        write_json(tmp / "summary.json", summary)
    return StageResult(folder, summary, reused=False)


def encode_cached(encoder: TextEncoder, cache: EmbeddingCache, texts: list[str], progress: bool = True) -> tuple[np.ndarray, int]:
    """Vectors for ``texts``, encoding only those not in ``cache``; also the count of long texts encoded now."""
    hashes = [text_hash(t) for t in texts]
    todo = cache.missing(hashes)
    first = {h: i for i, h in reversed(list(enumerate(hashes)))}
    n_long = 0
    if todo:
        log.info("encode: %d distinct texts to encode (%d cached)", len(todo), len(set(hashes)) - len(todo))
    for start in range(0, len(todo), _FLUSH):
        batch = todo[start : start + _FLUSH]
        vectors, report = encoder.encode([texts[first[h]] for h in batch], progress=progress)
        cache.add(batch, vectors)
        n_long += report.count
    return cache.get(hashes), n_long


def read_item_knowledge(path: Path) -> pd.DataFrame:
    frame = read_parquet(path)
    if not {"item_index", "text"} <= set(frame.columns):
        raise InputError(f"{path}: needs columns item_index, text")
    return frame


def read_knowledge(path: Path) -> pd.DataFrame:
    """The generation stage's table, checked: (user_index, sample) unique, text a string."""
    frame = read_parquet(path)
    missing = [c for c in ("user_index", "sample", "text") if c not in frame.columns]
    if missing:
        raise InputError(f"{path}: needs columns user_index, sample, text ({', '.join(missing)} missing)")
    frame = frame[["user_index", "sample", "text"]]
    if frame["text"].isna().any():
        row = int(np.flatnonzero(frame["text"].isna().to_numpy())[0])
        raise InputError(f"{path}: text is missing in row {row}")
    for column in ("user_index", "sample"):
        if not pd.api.types.is_integer_dtype(frame[column]):
            raise InputError(f"{path}: column {column} must hold integers, got {frame[column].dtype}")
    duplicated = frame.duplicated(["user_index", "sample"])
    if duplicated.any():
        row = frame[duplicated].iloc[0]
        raise InputError(f"{path}: (user_index, sample) = ({row['user_index']}, {row['sample']}) appears twice")
    frame["text"] = frame["text"].astype(str)
    return frame.sort_values(["user_index", "sample"]).reset_index(drop=True)


def item_texts(items: pd.DataFrame, item_knowledge: pd.DataFrame | None = None) -> list[str]:
    """One text per item: ``Title. genres: Comedy, Drama. year: 1995.`` (+ item knowledge)."""
    skip = {"item_index", "item_id", "title"}
    columns = [c for c in items.columns if c not in skip and not _is_identifier(items[c])]
    parts = [items["title"].fillna("").astype(str) if "title" in items else items["item_id"].astype(str)]
    for column in columns:
        values = items[column].astype("string").fillna("").str.replace("|", ", ", regex=False)
        parts.append(values.where(values == "", f"{column}: " + values))
    texts = [". ".join(p for p in row if p) for row in zip(*parts)]
    if item_knowledge is not None:
        extra = item_knowledge.set_index("item_index")["text"].reindex(items["item_index"]).fillna("")
        texts = [f"{t}. {k}" if k else t for t, k in zip(texts, extra)]
    return texts


def _is_identifier(column: pd.Series) -> bool:
    """A column with a distinct value per item (ASIN, URL) says nothing as text."""
    return column.nunique() > 0.9 * len(column) and not pd.api.types.is_numeric_dtype(column) and len(column) > 10


def item_vectors_file(folder: str | Path, item_knowledge: bool = True) -> Path:
    """The item vectors a recommender reads: with the LLM's item texts when the run has them, unless told not to."""
    plain = Path(folder) / PLAIN_ITEMS
    return plain if not item_knowledge and plain.is_file() else Path(folder) / "items.safetensors"


def read_embeddings(folder: str | Path, item_knowledge: bool = True) -> Embeddings:
    """Load what ``run_encode_stage`` wrote."""
    folder = Path(folder)
    if not (folder / "users.safetensors").is_file():
        raise InputError(f"{folder}: no users.safetensors; run the encode stage first")
    users, items = read_safetensors(folder / "users.safetensors", "np"), read_safetensors(item_vectors_file(folder, item_knowledge), "np")
    encoder = read_json(folder / "summary.json")["encoder"]
    return Embeddings(users["user_index"], users["sample"], users["vectors"], items["item_index"], items["vectors"], encoder)
