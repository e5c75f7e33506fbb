"""Embedding cache keyed by the sha256 of each text.

One folder per encoder setting (name + long-text policy), shared by all
rounds of a run: item texts and repeated answers are encoded once. Vectors
live in safetensors shards (``hashes`` uint8 (n, 32), ``vectors`` float32
(n, dim)); each shard is written atomically as soon as its batch is done, so
a crash loses at most the batch in flight.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save

from dpo4rec.artifacts import write_bytes_atomic, write_json
from dpo4rec.errors import InputError

log = logging.getLogger(__name__)


def text_hash(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def cache_key(encoder_name: str, long_texts: str) -> str:
    """A readable, collision-safe folder name for one encoder setting."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", encoder_name.rsplit("/", 1)[-1])[:40]
    digest = hashlib.sha256(f"{encoder_name}\n{long_texts}".encode()).hexdigest()[:12]
    return f"{slug}-{digest}"


class EmbeddingCache:
    """``hash -> vector`` for one encoder, backed by shards in ``folder``."""

    def __init__(self, folder: Path, dim: int, encoder_name: str):
        self.folder = Path(folder)
        self.dim = dim
        self._rows: dict[bytes, np.ndarray] = {}
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / "encoder.json", {"encoder": encoder_name, "dim": dim})
        for shard in sorted(self.folder.glob("shard-*.safetensors")):
            try:
                data = load_file(shard)
            except Exception as exc:  # a damaged shard: its texts are encoded again
                log.warning("%s: damaged embedding cache shard (%s); removed, its texts will be encoded again", shard, exc)
                shard.unlink()
                continue
            if data["vectors"].shape[1] != dim:
                raise InputError(f"{shard}: cached vectors have dimension {data['vectors'].shape[1]}, the encoder {dim}; remove {self.folder}")
            for key, vector in zip(data["hashes"], data["vectors"]):
                self._rows[key.tobytes()] = vector

    def __len__(self) -> int:
        return len(self._rows)

    def missing(self, hashes: list[bytes]) -> list[bytes]:
        """The distinct hashes not cached yet, in first-seen order."""
        return [h for h in dict.fromkeys(hashes) if h not in self._rows]

    def add(self, hashes: list[bytes], vectors: np.ndarray) -> None:
        """Store a batch of vectors (one new shard)."""
        if not hashes:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        keys = np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(len(hashes), 32)
        write_bytes_atomic(self.folder / f"shard-{uuid.uuid4().hex}.safetensors", save({"hashes": keys, "vectors": vectors}))
        for key, vector in zip(hashes, vectors):
            self._rows[key] = vector

    def get(self, hashes: list[bytes]) -> np.ndarray:
        """``(len(hashes), dim)`` vectors; every hash must be cached."""
        if not hashes:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self._rows[h] for h in hashes])
