"""The next-item protocol through the stages: data, recommend (SASRec with and without knowledge), the reward."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dpo4rec.artifacts import read_parquet
from dpo4rec.config import DataConfig, EncodeConfig, PipelineConfig, RecommendConfig
from dpo4rec.data.next_item import run_sequences
from dpo4rec.data.stage import read_protocol, run_data_stage, used_items
from dpo4rec.encode.stage import read_embeddings, run_encode_stage
from dpo4rec.errors import InputError
from dpo4rec.recommend import load_recommender, run_recommend_stage
from dpo4rec.recommend.features import user_knowledge
from dpo4rec.recommend.sequential import VALIDATION_CUT, next_item_targets, rank_targets
from dpo4rec.reward.next_item import NextItemScorer

from .conftest import write_fixture_knowledge

SASREC = RecommendConfig(backbone="sasrec", embed_dim=32, hidden_dim=32, n_heads=1, n_layers=1, max_len=30, lr=3e-3,
                         batch_size=64, max_epochs=3, device="cpu")


@pytest.fixture(scope="module")
def next_item_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("next-item-run")
    run_data_stage(run, DataConfig(dataset="ml-100k", n_users=150, protocol="next_item", prompt_history_max=10, background_users=200))
    write_fixture_knowledge(run)
    run_encode_stage(run, 0, EncodeConfig(), progress=False)
    return run


def test_the_data_stage_keeps_both_targets_out_of_the_prompt(next_item_run):
    protocol = read_protocol(next_item_run / "data")
    assert protocol.summary["protocol"]["name"] == "next_item" and len(protocol.lists) == 0
    inter = protocol.interactions
    n = inter.groupby("user_index")["position"].transform("size")
    prompt = inter[inter["in_prompt"]]
    assert (prompt["position"] < n[prompt.index] - 2).all()  # never the validation (n - 2) or test (n - 1) item
    assert (prompt.groupby("user_index").size() == 10).all()  # the last 10 before the validation target (ML-100k: >= 20 each)
    last_before = inter[inter["position"] == n - 3]
    assert inter.loc[last_before.index, "in_prompt"].all()  # the prompt ends right before the validation target
    # the background users: others of the data set, sequences only (no prompt, no text, no evaluation)
    background = protocol.background
    assert len(background) == 200 and not set(background["user_id"]) & set(protocol.users["user_id"])
    assert all(len(s) >= 3 for s in background["items"])
    # every item of the data set is a candidate, so every one is encoded
    assert len(used_items(next_item_run / "data")) == len(protocol.items) == protocol.summary["items"]
    assert (read_embeddings(next_item_run / "round_0" / "encode").item_index.size == len(protocol.items))


def test_sasrec_trains_on_the_run_and_reports_full_ranking(next_item_run):
    plain = run_recommend_stage(next_item_run, 0, replace(SASREC, knowledge=False), progress=False)
    kar = run_recommend_stage(next_item_run, 0, SASREC, progress=False)
    users = read_parquet(next_item_run / "data" / "users.parquet")
    for result in (plain, kar):
        metrics = result.summary
        assert set(metrics["test"]) == {f"{m}@{k}" for m in ("hr", "ndcg") for k in (5, 10, 20)}
        test = read_parquet(result.folder / "test_lists.parquet")
        assert sorted(test["user_index"]) == sorted(users.loc[users["split"] == "test", "user_index"])  # one row per test user
        assert metrics["test"]["hr@10"] == pytest.approx(test["hr@10"].mean())
    assert plain.folder.name == "sasrec-no-knowledge" and kar.folder.name == "sasrec"
    assert kar.summary["targets"]["train_sequences"] == 150 + 200  # the background users train too (ML-100k: >= 20 items each)
    assert kar.summary["users_without_knowledge"] == {"validation": 0, "test": 0}
    # the saved model reloads and ranks the test targets as the stage measured them
    model = load_recommender(kar.folder)
    sequences = run_sequences(read_parquet(next_item_run / "data" / "interactions.parquet"), len(users))
    test_users = users.loc[users["split"] == "test", "user_index"].to_numpy()
    targets = next_item_targets([sequences[u] for u in test_users], test_users, 1, SASREC.max_len)
    emb = read_embeddings(next_item_run / "round_0" / "encode")
    knowledge = user_knowledge(len(users), *emb.for_sample(0))
    ranks = rank_targets(model, targets, knowledge)
    measured = read_parquet(kar.folder / "test_lists.parquet").set_index("user_index").loc[test_users, "hr@10"].to_numpy()
    assert ((ranks < 10).astype(float) == measured).all()


def test_a_reranker_on_next_item_data_is_refused(next_item_run):
    with pytest.raises(InputError, match="does not fit"):
        run_recommend_stage(next_item_run, 0, replace(SASREC, backbone="prm"), progress=False)
    with pytest.raises(InputError, match="must be sasrec"):
        PipelineConfig(data=DataConfig(protocol="next_item"))


def test_next_item_rewards_are_the_validation_targets_log_probability_and_rank(next_item_run):
    folder = run_recommend_stage(next_item_run, 0, SASREC, progress=False).folder
    scorer = NextItemScorer.from_folders(next_item_run / "data", folder)
    emb = read_embeddings(next_item_run / "round_0" / "encode")
    users = read_parquet(next_item_run / "data" / "users.parquet")
    train = users.loc[users["split"] == "train", "user_index"].to_numpy()[:6]
    rows = np.isin(emb.user_index, train)
    user_index, vectors = emb.user_index[rows], emb.user_vectors[rows]
    loglik = scorer.score(user_index, vectors, reward="loglik")
    ndcg = scorer.score(user_index, vectors, reward="ndcg")
    # recomputed from the model's own forward pass, one row at a time
    model = load_recommender(folder)
    sequences = run_sequences(read_parquet(next_item_run / "data" / "interactions.parquet"), len(users))
    for i, (u, v) in enumerate(zip(user_index, vectors)):
        target = next_item_targets([sequences[u]], np.array([u]), VALIDATION_CUT, SASREC.max_len)
        with torch.no_grad():
            scores = model(target.items, target.lengths, torch.as_tensor(v)[None])[0]
        allowed = torch.ones_like(scores, dtype=torch.bool)
        allowed[0] = False
        allowed[torch.as_tensor(target.seen[0])] = False
        allowed[target.target[0]] = True
        expected = torch.log_softmax(scores[allowed], 0)[allowed[: target.target[0] + 1].sum() - 1]
        assert loglik[i] == pytest.approx(float(expected), abs=1e-4)
        rank = int((scores[allowed] >= scores[target.target[0]]).sum()) - 1
        assert ndcg[i] == pytest.approx(1 / np.log2(rank + 2))
    assert len(set(np.round(loglik, 6))) > 1  # the texts move the reward
    text_match = NextItemScorer.from_folders(next_item_run / "data", item_vectors=(emb.item_index, emb.item_vectors))
    assert np.isfinite(text_match.score(user_index, vectors, reward="listwise")).all()


def test_sasrec_trains_on_each_train_users_best_rewarded_text(next_item_run, tmp_path):
    """recommend.train_text = "best" under next_item: each train user's text is the one its reward ranked first."""
    import shutil

    import pandas as pd

    run = tmp_path / "run"
    shutil.copytree(next_item_run, run)
    emb = read_embeddings(run / "round_0" / "encode")
    users = read_parquet(run / "data" / "users.parquet")
    train = users.loc[users["split"] == "train", "user_index"].to_numpy()
    rows = np.isin(emb.user_index, train)
    scorer = NextItemScorer.from_folders(run / "data", item_vectors=(emb.item_index, emb.item_vectors))
    rewards = pd.DataFrame({"user_index": emb.user_index[rows], "sample": emb.sample[rows],
                            "reward": scorer.score(emb.user_index[rows], emb.user_vectors[rows], reward="listwise")})
    (run / "round_0" / "reward").mkdir()
    rewards.to_parquet(run / "round_0" / "reward" / "rewards.parquet", index=False)
    result = run_recommend_stage(run, 0, replace(SASREC, train_text="best"), progress=False)
    best = rewards.loc[rewards.groupby("user_index")["reward"].idxmax()]  # continuous rewards: no ties here
    assert result.folder.name == "sasrec-best-text" and (result.folder / "model.safetensors").is_file()
    assert result.summary["best_text"]["train_users_rewarded"] == len(best) == len(train)
    assert result.summary["best_text"]["train_users_not_greedy"] == int((best["sample"] != 0).sum()) > 0
    assert set(result.summary["test"]) >= {"hr@10", "ndcg@10"}


def test_the_data_command_prints_the_next_item_summary(tmp_path, capsys):
    from dpo4rec.cli import main

    assert main(["data", "--out", str(tmp_path / "run"), "--dataset", "ml-100k", "--users", "30", "--set", "data.protocol=next_item",
                 "--set", "recommend.backbone=sasrec", "--set", "data.background_users=40"]) == 0
    out = capsys.readouterr().out
    assert "background users              40" in out and "items (all candidates)        1,682" in out
