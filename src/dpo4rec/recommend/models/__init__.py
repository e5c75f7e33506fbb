"""Recommenders, one file each, registered by name (``MODELS``): the re-rankers and SASRec."""

from dpo4rec.recommend.models import dlcm, prm, sasrec, setrank  # noqa: F401  (registers the models)
from dpo4rec.recommend.models.base import MODELS, ModelSpec, Reranker, build_model, register, rerankers

__all__ = ["MODELS", "ModelSpec", "Reranker", "build_model", "register", "rerankers"]
