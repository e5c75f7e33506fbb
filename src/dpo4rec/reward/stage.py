"""The reward stage: score every sampled text, turn the train users' rewards into DPO pairs.

Reads round t's ``encode/`` (one vector per (user, sample)), the reward
recommender, ``generate/`` and ``prompts/``; writes ``RUN/round_<t>/reward/``:

* ``rewards.parquet``: user_index, sample, reward (mean NDCG@5 over the
  user's reward lists with that text's vector plugged in), text;
* ``pairs.parquet``: user_index, prompt, chosen, rejected, reward_chosen,
  reward_rejected, sample_chosen, sample_rejected;
* ``validation_rewards.parquet`` / ``validation_pairs.parquet``: the same for
  the validation users with samples, scored on their validation lists by the
  same recommender (which never trained on them), with every two samples
  whose rewards differ as a pair; never used for training, only to check on
  unseen users what DPO learned (heldout/stage.py);
* ``summary.json`` (reward spread, ties, pair counts, for train and
  validation users; the reward's split-half reliability on the validation
  users, reward/reliability.py) and ``manifest.json``.

Only train users' pairs feed DPO; test users are never scored.

``align.reward_model = "text_match"`` scores the same lists with no recommender: each
candidate by the cosine between the text's vector and the item's (reward/scorers.py,
``TextMatchScorer``); nothing is trained for it.

Reward lists (``align.reward_lists``): "held_out" (default) scores each train
user's last ``reward_holdout`` share of lists with ``<backbone>-reward-holdout``,
a recommender trained without them (``align.reward_seeds`` > 1: the mean
reward of that many such recommenders, ``-seed<s>`` for the seeds after the
first); "train" scores all train lists with the round's recommender, which
trained on those very lists and may reward texts that merely help it recall
them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpo4rec.reward.pairs import make_pairs, reward_spread
from dpo4rec.reward.probe import reward_probe
from dpo4rec.reward.reliability import split_half_reliability
from dpo4rec.artifacts import StageFolder, StageResult, begin_stage, fingerprint_file, read_parquet, round_dir, write_json, write_parquet
from dpo4rec.config import AlignConfig, RecommendConfig
from dpo4rec.encode.stage import item_vectors_file
from dpo4rec.errors import InputError

STAGE = "reward"


def pairing_settings(align: AlignConfig, recommender_name: str) -> dict:
    """What decides a round's rewards and pairs, given its samples (the stage's manifest records it)."""
    return {"recommender": recommender_name, "reward": align.reward,
            "pairing": align.pairing, "validation_pairing": "all_gaps",
            "reward_lists": align.reward_lists, "reward_holdout": align.held_out_share,
            **({"reward_seeds": align.reward_seeds} if align.reward_seeds > 1 else {}),  # runs made before them keep their manifests
            **({"reward_model": align.reward_model} if align.reward_model != "recommender" else {})}


def run_reward_stage(run_dir: str | Path, round_index: int, recommend: RecommendConfig, align: AlignConfig) -> StageResult:
    """Rewards and preference pairs for round ``round_index``."""
    from dpo4rec.encode import read_embeddings

    run_dir = Path(run_dir)
    here = round_dir(run_dir, round_index)
    recommenders = reward_folders(run_dir, round_index, recommend, align)
    text_match = not recommenders
    if not recommend.knowledge and not text_match:
        raise InputError("the reward needs the knowledge-augmented recommender (recommend.knowledge = true)")
    recommender_name = "text_match" if text_match else recommenders[0].name
    needed = {
        "encode": here / "encode" / "users.safetensors",  # key: the stage that writes it (said when it is missing)
        **({"encode items": item_vectors_file(here / "encode", recommend.item_knowledge)} if text_match else {}),
        **{"recommend" + (f" {r.name}" if k else ""): r / "model.safetensors" for k, r in enumerate(recommenders)},
        "generate": here / "generate" / "knowledge.parquet",
        "prompts": run_dir / "prompts" / "prompts.parquet",
    }
    for stage, path in needed.items():
        if not path.is_file():
            raise InputError(f"{path} not found; run the {stage.split()[0]} stage for round {round_index} first")
    folder = here / STAGE
    manifest, done = begin_stage(folder, STAGE, pairing_settings(align, recommender_name),
                                 {name: fingerprint_file(path) for name, path in needed.items()})
    if done:
        return done

    embeddings = read_embeddings(here / "encode")
    scorer, split = round_reward_scorer(run_dir, round_index, recommend, align)
    knowledge = read_parquet(needed["generate"])
    prompts = read_parquet(needed["prompts"])
    summary = {"reward": align.reward, "pairing": align.pairing, "reward_lists": align.reward_lists, "recommender": recommender_name,
               "reward_seeds": align.reward_seeds}
    outputs = {}
    for name, users, lists in (("train", split_user_indices(run_dir, "train"), split),
                               ("validation", split_user_indices(run_dir, "validation"), "validation")):
        sampled_users = np.unique(embeddings.user_index[(embeddings.sample > 0) & np.isin(embeddings.user_index, users)])
        if len(sampled_users) == 0:
            field = f"generate.sampled_{name}_users"
            raise InputError(f"{here / 'knowledge'}: no sampled texts for {name} users ({field}, generate.n_samples >= 2)")
        rewards = scorer.score_embeddings(embeddings, split=lists, users=sampled_users, reward=align.reward)
        # validation users: every pair whose rewards differ (the held-out check scores each text once, so all pairs are free)
        pairing = align.pairing if name == "train" else "all_gaps"
        pairs = make_pairs(rewards, knowledge, prompts, pairing)
        outputs[name] = (rewards.merge(knowledge[["user_index", "sample", "text"]], on=["user_index", "sample"], how="left"), pairs)
        summary[name] = {"spread": reward_spread(rewards, pairs), "pairs": len(pairs), "users_with_pairs": int(pairs["user_index"].nunique()),
                         "sampled_users": int(len(sampled_users)),
                         "greedy_reward_mean": float(rewards.loc[rewards["sample"] == 0, "reward"].mean())}
        if name == "validation" and scorer.lists is not None:  # does the reward have signal? Its agreement between two halves of their lists
            summary[name]["reliability"] = split_half_reliability(scorer, embeddings, sampled_users, align.reward)
    # is the reward's preference shared across users at all? A linear probe carried from train to validation users
    summary["validation"]["reward_probe"] = reward_probe(embeddings, knowledge, outputs["train"][0], outputs["validation"][0])
    summary["pairs"] = summary["train"]["pairs"]  # what DPO trains on
    with StageFolder(folder, manifest) as tmp:
        write_parquet(tmp / "rewards.parquet", outputs["train"][0])
        write_parquet(tmp / "pairs.parquet", outputs["train"][1])
        write_parquet(tmp / "validation_rewards.parquet", outputs["validation"][0])
        write_parquet(tmp / "validation_pairs.parquet", outputs["validation"][1])
        write_json(tmp / "summary.json", summary)
    return StageResult(folder, summary, False)


def reward_folders(run_dir: Path, round_index: int, recommend: RecommendConfig, align: AlignConfig) -> list[Path]:
    """The round's reward recommenders: one, or align.reward_seeds of them (their rewards are averaged); none for
    align.reward_model = "text_match", which has no model."""
    from dpo4rec.recommend import reward_model_name

    if align.reward_model != "recommender":
        return []
    here = round_dir(Path(run_dir), round_index) / "recommend"
    if next_item_run(run_dir):  # the round's own recommender: it never trained on the validation targets
        return [here / reward_model_name(recommend)]
    return [here / reward_model_name(recommend, align.held_out_share, k) for k in range(align.reward_seeds)]


def next_item_run(run_dir: Path) -> bool:
    """Whether the run's data stage applied the next-item protocol (rewards then score validation targets)."""
    from dpo4rec.artifacts import read_json
    from dpo4rec.data.protocol import protocol_name

    summary = Path(run_dir) / "data" / "summary.json"
    return summary.is_file() and protocol_name(read_json(summary)) == "next_item"


def round_reward_scorer(run_dir: Path, round_index: int, recommend: RecommendConfig, align: AlignConfig):
    """Round t's reward (align.reward_model: its reward recommenders, or text matching on its item vectors) and the
    split of lists a train user's reward averages over."""
    if next_item_run(run_dir):
        from dpo4rec.devices import resolve_device
        from dpo4rec.encode import read_embeddings
        from dpo4rec.reward.next_item import NextItemScorer

        if align.reward_model == "text_match":
            emb = read_embeddings(round_dir(Path(run_dir), round_index) / "encode", recommend.item_knowledge)
            return NextItemScorer.from_folders(Path(run_dir) / "data", item_vectors=(emb.item_index, emb.item_vectors)), "validation"
        folder = reward_folders(run_dir, round_index, recommend, align)[0]
        return NextItemScorer.from_folders(Path(run_dir) / "data", folder, device=str(resolve_device(recommend.device, "recommend.device"))), "validation"
    if align.reward_model == "text_match":
        from dpo4rec.reward.scorers import TextMatchScorer

        scorer = TextMatchScorer.from_folders(round_dir(Path(run_dir), round_index) / "encode", Path(run_dir) / "data",
                                              recommend.item_knowledge, align.held_out_share)
        return scorer, reward_list_split(align)
    return reward_scorer(reward_folders(run_dir, round_index, recommend, align), Path(run_dir), align, recommend.device)


def reward_scorer(recommender: Path | list[Path], run_dir: Path, align: AlignConfig, device: str = "auto"):
    """The reward recommender's scorer (on ``device``, a recommend.device value), and the split of lists its rewards
    average over. Several folders: an ensemble whose reward is the mean of theirs."""
    from dpo4rec.devices import resolve_device
    from dpo4rec.reward.scorers import EnsembleScorer, RewardScorer

    folders = [recommender] if isinstance(recommender, Path) else list(recommender)
    scorers = [RewardScorer.from_folders(folder, run_dir / "data", str(resolve_device(device, "recommend.device")),
                                         reward_holdout=align.held_out_share) for folder in folders]
    return scorers[0] if len(scorers) == 1 else EnsembleScorer(scorers), reward_list_split(align)


def reward_list_split(align: AlignConfig) -> str:
    """The split of lists a train user's reward averages over: the held-out "reward" lists, or the train lists."""
    return "reward" if align.held_out_share else "train"


def split_user_indices(run_dir: Path, split: str) -> np.ndarray:
    users = read_parquet(run_dir / "data" / "users.parquet")
    return users.loc[users["split"].astype(str) == split, "user_index"].to_numpy()


def train_user_indices(run_dir: Path) -> np.ndarray:
    return split_user_indices(run_dir, "train")
