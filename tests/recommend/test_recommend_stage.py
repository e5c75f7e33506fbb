import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from dpo4rec.cli import main
from dpo4rec.config import RecommendConfig
from dpo4rec.errors import InputError
from dpo4rec.recommend.checkpoint import load_recommender
from dpo4rec.recommend.features import list_tensors, user_knowledge
from dpo4rec.recommend.stage import run_recommend_stage
from dpo4rec.recommend.train import predict

MISSING_USERS = 5  # as in conftest.py


def test_stage_with_and_without_knowledge(ml100k_run, ml100k):
    protocol, emb = ml100k
    config = RecommendConfig(backbone="prm", max_epochs=2, device="cpu")
    on = run_recommend_stage(ml100k_run, 0, config, progress=False)
    off = run_recommend_stage(ml100k_run, 0, RecommendConfig(backbone="prm", knowledge=False, max_epochs=2, device="cpu"), progress=False)
    assert on.folder.name == "prm" and off.folder.name == "prm-no-knowledge"
    for result in (on, off):
        names = {p.name for p in result.folder.iterdir()}
        assert names == {"model.safetensors", "model.json", "curve.json", "metrics.json", "test_lists.parquet",
                         "validation_lists.parquet", "manifest.json"}
        metrics = json.loads((result.folder / "metrics.json").read_text())
        assert metrics["test"]["map@5"] > metrics["baselines"]["random"]["map@5"]
        assert len(json.loads((result.folder / "curve.json").read_text())) == metrics["epochs"]
    # the documented policy: users without knowledge use the learned vector, and are counted
    assert on.summary["users_without_knowledge"]["train"] >= MISSING_USERS
    assert off.summary["users_without_knowledge"] is None

    # the saved model rebuilds to the same scores; the stage reuses its folder
    model = load_recommender(on.folder)
    lists = list_tensors(protocol.lists).of_split("test")
    users, vectors = emb.for_sample(0)
    knowledge = user_knowledge(len(protocol.users), users, vectors)
    scores = predict(model, lists, knowledge)
    from dpo4rec.metrics import mean_metrics, rerank_metrics
    assert mean_metrics(rerank_metrics(lists.labels.numpy(), scores))["map@5"] == pytest.approx(on.summary["test"]["map@5"], abs=1e-6)
    assert run_recommend_stage(ml100k_run, 0, config, progress=False).reused


def test_knowledge_vectors_of_another_dimension_are_refused(ml100k):
    from dpo4rec.recommend.train import build_recommender

    protocol, emb = ml100k
    lists = list_tensors(protocol.lists).subset(np.arange(2))
    model = build_recommender(RecommendConfig(device="cpu"), protocol.items, lists, emb.dim, (emb.item_index, emb.item_vectors), emb.encoder)
    with pytest.raises(InputError, match="dimension 100, the model expects 384"):
        model(lists.items, lists.history, torch.zeros(2, 100))


def test_embeddings_that_cover_no_train_user_are_refused(ml100k_run, ml100k, tmp_path):
    from dpo4rec.recommend.stage import fit_and_evaluate
    from dpo4rec.recommend.train import build_recommender

    protocol, emb = ml100k
    lists = list_tensors(protocol.lists)
    test_users = protocol.users.loc[protocol.users["split"] == "test", "user_index"].to_numpy()
    knowledge = user_knowledge(len(protocol.users), test_users, np.zeros((len(test_users), emb.dim), np.float32))
    model = build_recommender(RecommendConfig(device="cpu"), protocol.items, lists, emb.dim, (emb.item_index, emb.item_vectors))
    with pytest.raises(InputError, match="cover no train user"):
        fit_and_evaluate(model, lists, knowledge, RecommendConfig(max_epochs=1), {}, progress=False)


def test_cli_recommend_errors_are_one_line(tmp_path):
    assert main(["data", "--dataset", "ml-100k", "--users", "30", "--out", str(tmp_path)]) == 0
    for argv in (["recommend", "--out", str(tmp_path)], ["recommend", "--out", str(tmp_path / "none"), "--no-knowledge"],
                 ["recommend", "--out", str(tmp_path), "--backbone", "nope", "--no-knowledge"]):
        result = subprocess.run([sys.executable, "-m", "dpo4rec", *argv], capture_output=True, text=True)
        assert result.returncode == 2, (argv, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr


def test_cli_recommend_no_knowledge_prints_the_table(tmp_path, capsys):
    assert main(["data", "--dataset", "ml-100k", "--users", "60", "--out", str(tmp_path)]) == 0
    assert main(["recommend", "--out", str(tmp_path), "--backbone", "dlcm", "--no-knowledge", "--epochs", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "dlcm (no knowledge)" in out and "popularity" in out and "random" in out
    assert (tmp_path / "round_0" / "recommend" / "dlcm-no-knowledge" / "model.safetensors").is_file()


def test_reward_lists_are_each_train_users_last_quarter(ml100k):
    protocol, _ = ml100k
    from dpo4rec.recommend.features import mark_reward_lists

    marked = mark_reward_lists(protocol.lists, 0.25)
    assert (marked["split"] != protocol.lists["split"]).sum() == (marked["split"] == "reward").sum() > 0
    assert set(protocol.lists.loc[marked["split"] == "reward", "split"]) == {"train"}  # validation/test untouched
    for user, group in marked[protocol.lists["split"] == "train"].groupby("user_index"):
        held = group.sort_values("chunk")["split"].to_numpy() == "reward"
        n_held = max(1, int(np.ceil(len(group) * 0.25)))
        assert held.sum() == n_held and held[-n_held:].all(), user  # the latest lists, by time


def test_held_out_reward_recommender_never_trains_on_the_reward_lists(ml100k_run, ml100k):
    protocol, emb = ml100k
    from dpo4rec.reward.scorers import RewardScorer

    config = RecommendConfig(backbone="prm", max_epochs=1, device="cpu")
    result = run_recommend_stage(ml100k_run, 0, config, progress=False, reward_holdout=0.25)
    assert result.folder.name == "prm-reward-holdout"
    n_train = int((protocol.lists["split"] == "train").sum())
    held = int(np.sum([max(1, np.ceil(n * 0.25)) for n in protocol.lists[protocol.lists["split"] == "train"].groupby("user_index").size()]))
    assert result.summary["lists"]["train"] == n_train - held
    scorer = RewardScorer.from_folders(result.folder, ml100k_run / "data", reward_holdout=0.25)
    train_users = protocol.users.loc[protocol.users["split"] == "train", "user_index"].to_numpy()[:20]
    table = scorer.score_embeddings(emb, split="reward", users=train_users)
    assert table["user_index"].isin(train_users).all() and table["reward"].between(0, 1).all()
    assert run_recommend_stage(ml100k_run, 0, config, progress=False, reward_holdout=0.25).reused


def test_best_text_vectors_take_each_train_users_highest_reward():
    from dpo4rec.encode.stage import Embeddings
    from dpo4rec.recommend.stage import best_text_vectors

    # users 0..4, samples 0..2; the vector of (user u, sample s) is [u, s]
    user_index, sample = np.repeat(np.arange(5), 3), np.tile(np.arange(3), 5)
    emb = Embeddings(user_index, sample, np.stack([user_index, sample], 1).astype(np.float32), np.arange(1), np.zeros((1, 2)), "x")
    rewards = pd.DataFrame({
        "user_index": [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4],
        "sample": [0, 1, 2, 0, 1, 2, 0, 1, 0, 2, 0, 1],
        "reward": [0.1, 0.3, 0.5, 0.4, 0.4, 0.2, np.nan, np.nan, 0.1, 0.9, 0.0, 0.7],
    })
    users_table = pd.DataFrame({"user_index": range(5), "split": ["train", "train", "train", "validation", "train"]})
    greedy_users = np.array([0, 1, 2, 3])  # user 4 has no greedy vector here: its best one is added
    users, vectors, counts = best_text_vectors(emb, greedy_users, emb.user_vectors[sample == 0][:4], rewards, users_table)
    chosen = {int(u): int(v[1]) for u, v in zip(users, vectors)}
    # 0: the highest reward; 1: a tie goes to the greedy text; 2: no finite reward keeps greedy;
    # 3: a validation user's reward never chooses; 4: added with its best sample
    assert chosen == {0: 2, 1: 0, 2: 0, 3: 0, 4: 1}
    assert counts == {"train_users_rewarded": 3, "train_users_not_greedy": 2}
    assert (vectors[:, 0] == users).all()  # each vector is its own user's


def test_several_seeds_average_each_list_and_keep_each_seed(ml100k_run, tmp_path):
    import shutil

    from dpo4rec.report.report import per_seed_differences

    results = {}
    for seeds in (1, 2):
        run = tmp_path / f"seeds{seeds}"
        shutil.copytree(ml100k_run / "data", run / "data")
        config = RecommendConfig(backbone="prm", knowledge=False, max_epochs=2, device="cpu", seeds=seeds)
        results[seeds] = run_recommend_stage(run, 0, config, progress=False)
    one = pd.read_parquet(results[1].folder / "test_lists.parquet")
    two = pd.read_parquet(results[2].folder / "test_lists.parquet")
    assert "map@5_seed1" not in one.columns
    np.testing.assert_array_equal(two["map@5_seed1"], one["map@5"])  # the first training is the single run's
    assert not np.array_equal(two["map@5_seed2"], two["map@5_seed1"])  # another seed, another model
    np.testing.assert_allclose(two["map@5"], (two["map@5_seed1"] + two["map@5_seed2"]) / 2)
    metrics = results[2].summary
    assert [s["seed"] for s in metrics["seeds"]] == [0, 1]
    assert metrics["seeds"][0]["test"]["map@5"] == results[1].summary["test"]["map@5"]
    assert metrics["test"]["map@5"] == pytest.approx(np.mean([s["test"]["map@5"] for s in metrics["seeds"]]))
    validation = pd.read_parquet(results[2].folder / "validation_lists.parquet")
    assert metrics["validation"]["map@5"] == pytest.approx(validation["map@5"].mean())
    # the report's per-seed differences: seed k of one arm against seed k of the other
    shifted = two.assign(**{"map@5_seed2": two["map@5_seed2"] + 0.1})
    assert per_seed_differences(shifted, two, "map@5")["per_seed"] == pytest.approx([0.0, 0.1])
    assert per_seed_differences(one, two, "map@5") == {}
    with pytest.raises(InputError, match="recommend.seeds must be >= 1, got 0"):
        RecommendConfig(seeds=0)
