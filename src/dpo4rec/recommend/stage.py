"""The recommend stage: train one re-ranker, write ``RUN/round_<t>/recommender/<name>/``.

``<name>`` is the backbone (``prm``), ``prm-no-knowledge`` for the ID-only
baseline, or ``prm-reward-holdout`` for the reward model trained without each
train user's last lists (the reward is then computed on those), so every
variant keeps its own folder. Files:

* ``model.safetensors`` + ``model.json``: weights and the spec to rebuild them;
* ``curve.json``: per epoch, train loss and validation metrics;
* ``metrics.json``: test metrics (mean over lists), the best validation
  metrics, random and popularity rankings on the same test lists, users
  without knowledge per split, timings;
* ``test_lists.parquet``: per test list, user_index and every metric (for
  paired bootstrap intervals over users in the report);
* ``manifest.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dpo4rec.artifacts import StageFolder, existing_output, fingerprint_file, make_manifest, read_json, read_parquet, round_dir, write_json, write_parquet
from dpo4rec.config import RecommendConfig, to_dict
from dpo4rec.encode.stage import item_vectors_file, read_embeddings
from dpo4rec.errors import InputError
from dpo4rec.metrics import mean_metrics
from dpo4rec.recommend.baselines import baseline_metrics
from dpo4rec.recommend.checkpoint import save_recommender
from dpo4rec.recommend.features import list_tensors, mark_reward_lists, user_knowledge
from dpo4rec.recommend.train import build_recommender, evaluate, missing_knowledge, train_recommender

log = logging.getLogger(__name__)
STAGE = "recommend"
_DATA_FILES = ("users.parquet", "items.parquet", "interactions.parquet", "lists.parquet")


@dataclass
class RecommendStageResult:
    folder: Path
    metrics: dict
    reused: bool


def model_name(config: RecommendConfig, reward_holdout: float = 0.0) -> str:
    if reward_holdout > 0:
        return f"{config.backbone}-reward-holdout"
    if not config.knowledge:
        return f"{config.backbone}-no-knowledge"
    return config.backbone if config.item_knowledge else f"{config.backbone}-no-item-knowledge"


def run_recommend_stage(config: RecommendConfig, run_dir: str | Path, round_index: int = 0, progress: bool = True,
                        reward_holdout: float = 0.0) -> RecommendStageResult:
    """Train, evaluate and save one re-ranker for round ``round_index``, or reuse it.

    ``reward_holdout`` > 0 trains without each train user's last share of lists
    (see ``mark_reward_lists``): the held-out reward's model.
    """
    run_dir = Path(run_dir)
    data = run_dir / "data"
    embeddings_dir = round_dir(run_dir, round_index) / "embeddings"
    for name in _DATA_FILES:
        if not (data / name).is_file():
            raise InputError(f"{data / name} not found; run the data stage first")
    inputs = {name: fingerprint_file(data / name) for name in _DATA_FILES}
    if config.knowledge:
        for path in (embeddings_dir / "users.safetensors", item_vectors_file(embeddings_dir, config.item_knowledge)):
            if not path.is_file():
                raise InputError(f"{path} not found; run the encode stage for round {round_index} first (or set recommend.knowledge = false)")
            inputs[f"embeddings/{path.name}"] = fingerprint_file(path)
    settings = {k: v for k, v in to_dict(config).items() if k != "device"}
    if reward_holdout > 0:
        settings["reward_holdout"] = reward_holdout
    manifest = make_manifest(STAGE, {**settings, "round": round_index}, inputs)
    folder = round_dir(run_dir, round_index) / "recommender" / model_name(config, reward_holdout)
    if existing_output(folder, manifest):
        log.info("recommend stage: reusing %s", folder)
        return RecommendStageResult(folder, read_json(folder / "metrics.json"), reused=True)

    frames = {name: read_parquet(data / name) for name in _DATA_FILES}
    if reward_holdout > 0:
        if not config.knowledge:
            raise InputError("the held-out reward recommender needs knowledge (recommend.knowledge = true)")
        frames["lists.parquet"] = mark_reward_lists(frames["lists.parquet"], reward_holdout)
    lists = list_tensors(frames["lists.parquet"])
    knowledge, model = None, None
    if config.knowledge:
        emb = read_embeddings(embeddings_dir, config.item_knowledge)
        users, vectors = emb.for_sample(config.train_sample)
        if len(users) == 0:
            raise InputError(f"{embeddings_dir}: no vectors for sample {config.train_sample} (recommend.train_sample)")
        knowledge = user_knowledge(len(frames["users.parquet"]), users, vectors, str(embeddings_dir))
        model = build_recommender(config, frames["items.parquet"], lists, emb.dim, (emb.item_index, emb.item_vectors), emb.encoder)
    else:
        model = build_recommender(config, frames["items.parquet"], lists)
    metrics = fit_and_evaluate(model, lists, knowledge, config, frames, progress)
    with StageFolder(folder, manifest) as tmp:
        save_recommender(model, tmp)
        write_json(tmp / "curve.json", metrics.pop("_curve"))
        write_parquet(tmp / "test_lists.parquet", metrics.pop("_test_lists"))
        write_json(tmp / "metrics.json", metrics)
    return RecommendStageResult(folder, metrics, reused=False)


def fit_and_evaluate(model, lists, knowledge, config: RecommendConfig, frames: dict, progress: bool = True) -> dict:
    """Train, then measure on test lists beside the baselines (the dict keys starting with _ are tables)."""
    missing = missing_knowledge(lists, knowledge) if knowledge is not None else None
    if missing is not None:
        if missing["train"] == len(np.unique(lists.of_split("train").user_index.numpy())):
            raise InputError("the knowledge vectors cover no train user: were they made for another data run?")
        if any(missing.values()):
            log.warning("users without knowledge (they get the learned unknown vector): %s", missing)
    result = train_recommender(model, lists, knowledge, config, progress)
    test = lists.of_split("test")
    per_list = evaluate(model, test, knowledge, config)
    best = result.curve[result.best_epoch - 1]
    metrics = {
        "model": model.spec.backbone,
        "knowledge": config.knowledge,
        "test": mean_metrics(per_list),
        "validation": {k.removeprefix("validation_"): v for k, v in best.items() if k.startswith("validation_")},
        "baselines": baseline_metrics(test.items.numpy(), test.labels.numpy(), frames["interactions.parquet"], frames["users.parquet"], config.seed),
        "best_epoch": result.best_epoch,
        "epochs": len(result.curve),
        "train_seconds": result.seconds,
        "seconds_per_epoch": float(np.mean([row["seconds"] for row in result.curve])),
        "lists": {split: int((lists.split == split).sum()) for split in ("train", "validation", "test")},
        "users_without_knowledge": missing,
    }
    test_table = pd.DataFrame({"user_index": test.user_index.numpy(), **per_list})
    return {**metrics, "_curve": result.curve, "_test_lists": test_table}
