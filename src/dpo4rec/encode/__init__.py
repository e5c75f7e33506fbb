"""Text encoding: knowledge and item texts to vectors, cached per text hash."""

from dpo4rec.encode.encoder import DEFAULT_ENCODER, TextEncoder
from dpo4rec.encode.stage import Embeddings, item_texts, read_embeddings, run_encode_stage

__all__ = ["DEFAULT_ENCODER", "Embeddings", "TextEncoder", "item_texts", "read_embeddings", "run_encode_stage"]
