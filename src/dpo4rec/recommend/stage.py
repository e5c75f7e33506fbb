"""The recommend stage: train one re-ranker, write ``RUN/round_<t>/recommend/<name>/``.

``<name>`` is the backbone (``prm``), ``prm-no-knowledge`` for the ID-only
baseline, ``prm-reward-holdout`` for the reward model trained without each
train user's last lists (the reward is then computed on those),
``prm-best-text`` for the model trained on train users' best-rewarded texts
(``recommend.train_text = "best"``), so every variant keeps its own folder. Files:

* ``model.safetensors`` + ``model.json``: weights and the spec to rebuild them;
* ``curve.json``: per epoch, train loss and validation metrics;
* ``metrics.json``: test metrics (mean over lists), the best validation
  metrics, random and popularity rankings on the same test lists, users
  without knowledge per split, timings;
* ``test_lists.parquet`` / ``validation_lists.parquet``: per test (validation)
  list, user_index and every metric (for paired bootstrap intervals over users
  in the report); with ``recommend.seeds = k`` > 1 the mean over the k
  trainings, and MAP@5 / NDCG@5 of each (``map@5_seed1``, ...);
* ``manifest.json``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dpo4rec.artifacts import StageFolder, StageResult, begin_stage, fingerprint_file, read_json, read_parquet, round_dir, write_json, write_parquet
from dpo4rec.best_worst import best_and_worst
from dpo4rec.config import SEQUENTIAL_BACKBONES, RecommendConfig, to_dict
from dpo4rec.data.next_item import run_sequences
from dpo4rec.data.protocol import protocol_name
from dpo4rec.encode.stage import item_vectors_file, read_embeddings
from dpo4rec.errors import InputError
from dpo4rec.metrics import mean_metrics
from dpo4rec.recommend.baselines import baseline_metrics
from dpo4rec.recommend.checkpoint import save_recommender
from dpo4rec.recommend.features import UserKnowledge, list_tensors, mark_reward_lists, user_knowledge
from dpo4rec.recommend.sequential import VALIDATION_CUT, build_sequential, fit_and_evaluate_sequential, next_item_data, next_item_targets
from dpo4rec.recommend.train import build_recommender, evaluate, missing_knowledge, train_recommender

log = logging.getLogger(__name__)
STAGE = "recommend"
_DATA_FILES = ("users.parquet", "items.parquet", "interactions.parquet", "lists.parquet")
BACKGROUND = "background.parquet"  # next_item: users whose sequences only train the recommender


def model_name(config: RecommendConfig, reward_holdout: float = 0.0) -> str:
    if reward_holdout > 0:
        return f"{config.backbone}-reward-holdout"
    if not config.knowledge:
        return f"{config.backbone}-no-knowledge"
    name = config.backbone if config.item_knowledge else f"{config.backbone}-no-item-knowledge"
    return f"{name}-best-text" if config.train_text == "best" else name


def reward_model_name(config: RecommendConfig, reward_holdout: float = 0.0, member: int = 0) -> str:
    """The recommender that gives a round's rewards: trained on greedy texts (the best ones come from its rewards).
    ``member`` k > 0: the same trained with seed recommend.seed + k (align.reward_seeds)."""
    name = model_name(replace(config, knowledge=True, train_text="greedy"), reward_holdout)
    return f"{name}-seed{config.seed + member}" if member else name


def run_recommend_stage(run_dir: str | Path, round_index: int, config: RecommendConfig, progress: bool = True,
                        reward_holdout: float = 0.0, member: int = 0) -> StageResult:
    """Train, evaluate and save one re-ranker for round ``round_index``, or reuse it.

    ``reward_holdout`` > 0 trains without each train user's last share of lists
    (see ``mark_reward_lists``): the held-out reward's model; ``member`` k > 0
    the same with seed recommend.seed + k, in its own folder (align.reward_seeds).
    """
    run_dir = Path(run_dir)
    folder_name = model_name(config, reward_holdout)
    if member:
        if reward_holdout <= 0:
            raise InputError("more reward recommenders (align.reward_seeds > 1) need held-out reward lists")
        folder_name = reward_model_name(config, reward_holdout, member)
        config = replace(config, seed=config.seed + member)
    data = run_dir / "data"
    embeddings_dir = round_dir(run_dir, round_index) / "encode"
    for name in _DATA_FILES:
        if not (data / name).is_file():
            raise InputError(f"{data / name} not found; run the data stage first")
    inputs = {name: fingerprint_file(data / name) for name in _DATA_FILES}
    sequential = check_protocol(config, data)
    if sequential and (data / BACKGROUND).is_file():
        inputs[BACKGROUND] = fingerprint_file(data / BACKGROUND)
    if sequential and reward_holdout > 0:
        raise InputError("under data.protocol = next_item the reward is the validation target, which no recommender trains on: no reward-holdout model")
    rewards_path = round_dir(run_dir, round_index) / "reward" / "rewards.parquet"
    on_best_texts = config.knowledge and config.train_text == "best"
    if on_best_texts:
        if reward_holdout > 0:
            raise InputError("the held-out reward recommender trains on greedy texts (recommend.train_text = greedy)")
        if not rewards_path.is_file():
            raise InputError(f"{rewards_path} not found; recommend.train_text = best needs the reward stage of round {round_index} first")
        inputs["reward/rewards.parquet"] = fingerprint_file(rewards_path)
    if config.knowledge:
        for path in (embeddings_dir / "users.safetensors", item_vectors_file(embeddings_dir, config.item_knowledge)):
            if not path.is_file():
                raise InputError(f"{path} not found; run the encode stage for round {round_index} first (or set recommend.knowledge = false)")
            inputs[f"encode/{path.name}"] = fingerprint_file(path)
    settings = {k: v for k, v in to_dict(config).items() if k != "device"}
    if reward_holdout > 0:
        settings["reward_holdout"] = reward_holdout
    folder = round_dir(run_dir, round_index) / "recommend" / folder_name
    manifest, done = begin_stage(folder, STAGE, {**settings, "round": round_index}, inputs, summary="metrics.json")
    if done:
        return done

    frames = {name: read_parquet(data / name) for name in (*_DATA_FILES, *[BACKGROUND] * (BACKGROUND in inputs))}
    if reward_holdout > 0:
        if not config.knowledge:
            raise InputError("the held-out reward recommender needs knowledge (recommend.knowledge = true)")
        frames["lists.parquet"] = mark_reward_lists(frames["lists.parquet"], reward_holdout)
    knowledge, emb = None, None
    if config.knowledge:
        emb = read_embeddings(embeddings_dir, config.item_knowledge)
        users, vectors = emb.for_sample(0)  # the greedy texts
        if len(users) == 0:
            raise InputError(f"{embeddings_dir}: no vectors of the greedy texts (sample 0)")
        if on_best_texts:
            users, vectors, best_text = best_text_vectors(emb, users, vectors, read_parquet(rewards_path), frames["users.parquet"])
        knowledge = user_knowledge(len(frames["users.parquet"]), users, vectors, str(embeddings_dir))
    if reward_holdout > 0:
        config = replace(config, seeds=1)  # the reward reads one model's scores: more trainings would not change them
    if sequential:
        model, metrics = fit_sequential(config, frames, knowledge, emb, progress)
    else:
        lists = list_tensors(frames["lists.parquet"])
        text_parts = (emb.dim, (emb.item_index, emb.item_vectors), emb.encoder) if emb is not None else ()
        build = lambda seeded: build_recommender(seeded, frames["items.parquet"], lists, *text_parts)  # noqa: E731
        model, metrics = fit_and_evaluate(build, lists, knowledge, config, frames, progress)
    if on_best_texts:
        metrics["best_text"] = best_text
    with StageFolder(folder, manifest) as tmp:
        save_recommender(model, tmp)
        write_json(tmp / "curve.json", metrics.pop("_curve"))
        write_parquet(tmp / "test_lists.parquet", metrics.pop("_test_lists"))
        write_parquet(tmp / "validation_lists.parquet", metrics.pop("_validation_lists"))
        write_json(tmp / "metrics.json", metrics)
    return StageResult(folder, metrics, reused=False)


def check_protocol(config: RecommendConfig, data: Path) -> bool:
    """Whether the backbone is sequential; refuses one that does not fit the data stage's protocol."""
    protocol = protocol_name(read_json(data / "summary.json")) if (data / "summary.json").is_file() else "rerank"
    sequential = config.backbone in SEQUENTIAL_BACKBONES
    if sequential != (protocol == "next_item"):
        want = "sasrec" if protocol == "next_item" else "a re-ranker (dlcm, prm, setrank)"
        raise InputError(f"recommend.backbone = {config.backbone!r} does not fit {data} (data.protocol = {protocol!r}): use {want}")
    return sequential


def fit_sequential(config: RecommendConfig, frames: dict, knowledge, emb, progress: bool = True):
    """SASRec on the next-item protocol: every selected user's sequence trains, and the background users'
    (data.background_users: after the run's users, with no text); validation users' validation targets pick the
    epoch, with the background users' (a hundred validation users alone are too few: on Beauty the epoch picked
    by them stopped training at epoch 4, before SASRec had learned anything); test users' test targets are
    reported, and the validation users' are what a round is picked by."""
    users = frames["users.parquet"]
    split = users["split"].astype(str).to_numpy()
    sequences = run_sequences(frames["interactions.parquet"], len(users))
    if BACKGROUND in frames and len(frames[BACKGROUND]):
        sequences += [np.asarray(s, np.int64) for s in frames[BACKGROUND]["items"]]
        if knowledge is not None:  # rows for them, all unknown: they train the learned "unknown" vector
            knowledge = UserKnowledge(torch.cat([knowledge.vectors, knowledge.vectors.new_zeros(len(sequences) - len(users), knowledge.dim)]),
                                      torch.cat([knowledge.known, torch.zeros(len(sequences) - len(users), dtype=torch.bool)]))
    n_items = int(frames["items.parquet"]["item_index"].max())
    validation = np.flatnonzero(split == "validation")
    data = next_item_data(sequences, config.max_len, validation, np.flatnonzero(split == "test"), n_items)
    if len(sequences) > len(users):  # more targets pick the epoch: the validation users' and the background users'
        everyone = np.concatenate([validation, np.arange(len(users), len(sequences))])
        data.selection = next_item_targets([sequences[u] for u in everyone], everyone, VALIDATION_CUT, config.max_len)
    if emb is None:
        build = lambda seeded: build_sequential(seeded, n_items)  # noqa: E731
    else:
        build = lambda seeded: build_sequential(seeded, n_items, emb.dim, (emb.item_index, emb.item_vectors), emb.encoder)  # noqa: E731
    return fit_and_evaluate_sequential(build, data, knowledge, config, progress)


def fit_and_evaluate(build, lists, knowledge, config: RecommendConfig, frames: dict, progress: bool = True):
    """Train ``config.seeds`` models (``build(config)`` makes a fresh one), then measure on test lists beside the
    baselines. Returns the first seed's model and the metrics (the dict keys starting with _ are tables)."""
    missing = missing_knowledge(lists, knowledge) if knowledge is not None else None
    if missing is not None:
        if missing["train"] == len(np.unique(lists.of_split("train").user_index.numpy())):
            raise InputError("the knowledge vectors cover no train user: were they made for another data run?")
        if any(missing.values()):
            log.warning("users without knowledge (they get the learned unknown vector): %s", missing)
    test, validation = lists.of_split("test"), lists.of_split("validation")
    model, results, per_seed = None, [], {"test": [], "validation": []}
    for offset in range(config.seeds):
        seeded = replace(config, seed=config.seed + offset)
        trained = build(seeded)
        results.append(train_recommender(trained, lists, knowledge, seeded, progress))
        for split, split_lists in (("test", test), ("validation", validation)):
            per_seed[split].append(evaluate(trained, split_lists, knowledge, config))
        if model is None:  # the first seed's is the one saved; the others are only measured
            model = trained
    result = results[0]
    tables = {split: _per_list_table(split_lists, per_seed[split]) for split, split_lists in (("test", test), ("validation", validation))}
    best = result.curve[result.best_epoch - 1]
    metrics = {
        "model": model.spec.backbone,
        "knowledge": config.knowledge,
        "test": mean_metrics({m: tables["test"][m].to_numpy() for m in per_seed["test"][0]}),
        "validation": ({k.removeprefix("validation_"): v for k, v in best.items() if k.startswith("validation_")} if config.seeds == 1
                       else mean_metrics({m: tables["validation"][m].to_numpy() for m in per_seed["validation"][0]})),
        "baselines": baseline_metrics(test.items.numpy(), test.labels.numpy(), frames["interactions.parquet"], frames["users.parquet"], config.seed),
        "best_epoch": result.best_epoch,
        "epochs": len(result.curve),
        "train_seconds": result.seconds,
        "seconds_per_epoch": float(np.mean([row["seconds"] for row in result.curve])),
        "lists": {split: int((lists.split == split).sum()) for split in ("train", "validation", "test")},
        "users_without_knowledge": missing,
    }
    if config.seeds > 1:
        metrics["seeds"] = [{"seed": config.seed + i, "best_epoch": r.best_epoch, "test": mean_metrics(t), "validation": mean_metrics(v)}
                            for i, (r, t, v) in enumerate(zip(results, per_seed["test"], per_seed["validation"]))]
    return model, {**metrics, "_curve": result.curve, "_test_lists": tables["test"], "_validation_lists": tables["validation"]}


SEED_METRICS = ("map@5", "ndcg@5")  # kept per seed in the list tables (the report's per-seed differences)


def _per_list_table(lists, per_seed: list[dict[str, np.ndarray]]) -> pd.DataFrame:
    """user_index and each metric per list, averaged over the seeds' trainings; with several, also each seed's."""
    table = {"user_index": lists.user_index.numpy()}
    table.update({m: np.mean([seed[m] for seed in per_seed], axis=0) if len(per_seed) > 1 else per_seed[0][m] for m in per_seed[0]})
    if len(per_seed) > 1:
        table.update({f"{m}_seed{i + 1}": seed[m] for m in SEED_METRICS for i, seed in enumerate(per_seed)})
    return pd.DataFrame(table)


def best_text_vectors(emb, users: np.ndarray, vectors: np.ndarray, rewards: pd.DataFrame, users_table: pd.DataFrame):
    """``(users, vectors, counts)`` with each rewarded train user's vector swapped for that of their best text.

    Best = the highest reward among the user's scored texts (greedy included), ties to the lower sample
    (the greedy text first; best_worst.py); users with no finite reward keep what they had. Only train users'
    rewards are used, whatever the table holds: validation and test labels never choose a text.
    """
    train = users_table.loc[users_table["split"].astype(str) == "train", "user_index"].to_numpy()
    scored = rewards[np.isfinite(rewards["reward"].to_numpy(float)) & rewards["user_index"].isin(train)]
    best = best_and_worst(scored)["best"].rename("sample").reset_index()
    row_of = {(int(u), int(s)): i for i, (u, s) in enumerate(zip(emb.user_index, emb.sample))}
    position = {int(u): i for i, u in enumerate(users)}
    vectors = np.array(vectors, dtype=np.float32, copy=True)
    users = np.asarray(users, dtype=np.int64)
    extra_users, extra_vectors, swapped = [], [], 0
    for user, sample in zip(best["user_index"].astype(int), best["sample"].astype(int)):
        row = row_of.get((user, sample))
        if row is None:
            raise InputError(f"rewards.parquet: user {user} sample {sample} has no vector in the round's embeddings")
        swapped += int(sample != 0)
        if user in position:
            vectors[position[user]] = emb.user_vectors[row]
        else:
            extra_users.append(user)
            extra_vectors.append(emb.user_vectors[row])
    if extra_users:
        users = np.concatenate([users, np.asarray(extra_users, np.int64)])
        vectors = np.concatenate([vectors, np.stack(extra_vectors)])
    return users, vectors, {"train_users_rewarded": int(len(best)), "train_users_not_greedy": swapped}
