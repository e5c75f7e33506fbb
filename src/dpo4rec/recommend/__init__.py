"""Knowledge-augmented re-rankers (DLCM, PRM, SetRank), and their training."""

from dpo4rec.recommend.checkpoint import load_recommender, save_recommender
from dpo4rec.recommend.models import MODELS, ModelSpec, Reranker, build_model, register
from dpo4rec.recommend.stage import model_name, reward_model_name, run_recommend_stage

__all__ = [
    "MODELS", "ModelSpec", "Reranker", "build_model", "load_recommender",
    "model_name", "register", "reward_model_name", "run_recommend_stage", "save_recommender",
]
