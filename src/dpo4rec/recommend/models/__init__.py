"""Re-rankers, one file each, registered by name (``MODELS``)."""

from dpo4rec.recommend.models import dlcm, prm, setrank  # noqa: F401  (registers the models)
from dpo4rec.recommend.models.base import MODELS, ModelSpec, Reranker, build_model, register

__all__ = ["MODELS", "ModelSpec", "Reranker", "build_model", "register"]
