
import numpy as np
import pytest
import torch

from dpo4rec.config import RecommendConfig
from dpo4rec.errors import InputError
from dpo4rec.metrics import rerank_metrics
from dpo4rec.recommend.features import list_tensors, user_knowledge
from dpo4rec.reward.reliability import halves, split_half_reliability
from dpo4rec.reward.scorers import EnsembleScorer, RewardScorer
from dpo4rec.recommend.train import build_recommender, predict, train_recommender


def informative_vectors(protocol, emb) -> np.ndarray:
    """Per user: the centered mean text vector of the items the user labelled positive in the lists.

    That carries real signal about each user's positives (on purpose: labels leak).
    """
    item_vectors = np.zeros((int(protocol.items["item_index"].max()) + 1, emb.dim), np.float32)
    item_vectors[emb.item_index] = emb.item_vectors
    items, labels = np.stack(protocol.lists["items"]), np.stack(protocol.lists["labels"])
    vectors = np.zeros((len(protocol.users), emb.dim), np.float32)
    np.add.at(vectors, protocol.lists["user_index"].to_numpy(), (item_vectors[items] * labels[..., None]).sum(1))
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)
    vectors -= vectors.mean(0)  # the shared "average movie" direction says nothing about a user
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)


@pytest.fixture(scope="module")
def informed(ml100k):
    """PRM trained with informative knowledge vectors."""
    protocol, emb = ml100k
    lists = list_tensors(protocol.lists)
    vectors = informative_vectors(protocol, emb)
    knowledge = user_knowledge(len(protocol.users), np.arange(len(protocol.users)), vectors)
    config = RecommendConfig(backbone="prm", max_epochs=8, patience=8, device="cpu")
    model = build_recommender(config, protocol.items, lists, emb.dim, (emb.item_index, emb.item_vectors), emb.encoder)
    train_recommender(model, lists, knowledge, config, progress=False)
    return model, lists, vectors, knowledge


@pytest.mark.slow
def test_reward_ranks_an_informative_vector_above_noise(informed, ml100k):
    protocol, _ = ml100k
    model, lists, vectors, _ = informed
    scorer = RewardScorer(model, lists)
    train_users = protocol.users.loc[protocol.users["split"] == "train", "user_index"].to_numpy()
    noise = np.random.default_rng(1).standard_normal((len(train_users), vectors.shape[1])).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    # one batch: every user twice (sample 0 informative, sample 1 noise), interleaved
    users = np.repeat(train_users, 2)
    batch = np.empty((len(users), vectors.shape[1]), np.float32)
    batch[0::2], batch[1::2] = vectors[train_users], noise
    rewards = scorer.score(users, batch)
    scored = ~np.isnan(rewards[0::2])  # users with a train list that holds a positive
    better = rewards[0::2][scored] > rewards[1::2][scored]
    assert better.mean() > 0.7, better.mean()
    assert rewards[0::2][scored].mean() > rewards[1::2][scored].mean() + 0.02


@pytest.mark.slow
def test_batched_rewards_equal_the_per_list_metric(informed, ml100k):
    """Independent path: predict() over the user's lists, then rerank_metrics, mean per user."""
    protocol, _ = ml100k
    model, lists, vectors, knowledge = informed
    train_users = protocol.users.loc[protocol.users["split"] == "train", "user_index"].to_numpy()[:40]
    rewards = RewardScorer(model, lists, max_pairs=300).score(train_users, vectors[train_users])  # many small groups
    # lists without a positive carry no signal: the reward leaves them out
    mine = lists.subset(np.flatnonzero(np.isin(lists.user_index.numpy(), train_users) & (lists.labels.numpy().max(1) > 0)))
    ndcg = rerank_metrics(mine.labels.numpy(), predict(model, mine, knowledge))["ndcg@5"]
    owner = mine.user_index.numpy()
    expected = np.array([ndcg[owner == u].mean() for u in train_users])
    np.testing.assert_allclose(rewards, expected, atol=1e-5)


def test_reward_scoring_gives_one_reward_per_sample_and_refuses_bad_input(ml100k):
    protocol, emb = ml100k
    lists = list_tensors(protocol.lists)
    model = build_recommender(RecommendConfig(device="cpu"), protocol.items, lists, emb.dim, (emb.item_index, emb.item_vectors), emb.encoder)
    scorer = RewardScorer(model, lists)
    train_users = protocol.users.loc[protocol.users["split"] == "train", "user_index"].to_numpy()[:200]
    users = np.repeat(train_users, 10)  # 200 users x 10 samples
    vectors = np.random.default_rng(0).standard_normal((len(users), emb.dim)).astype(np.float32)
    rewards = scorer.score(users, vectors)  # its speed: benchmarks/recommend.py
    scored = ~np.isnan(rewards)
    assert rewards.shape == (2000,) and ((rewards[scored] >= 0) & (rewards[scored] <= 1)).all()
    # NaN exactly for users whose train lists hold no positive (no list carries a signal)
    positive = np.asarray([(lists.labels.numpy()[(lists.user_index.numpy() == u) & (lists.split == "train")].max(1) > 0).any() for u in users])
    assert (scored == positive).all()

    with pytest.raises(InputError, match=r"expects \(n, 384\)"):
        scorer.score(users[:3], vectors[:3, :100])
    test_user = protocol.users.loc[protocol.users["split"] == "test", "user_index"].iloc[0]
    with pytest.raises(InputError, match="no train lists"):
        scorer.score(np.array([test_user]), vectors[:1])
    assert scorer.score(np.array([test_user]), vectors[:1], split="test").shape == (1,)
    with pytest.raises(InputError, match="trained with knowledge"):
        RewardScorer(build_recommender(RecommendConfig(knowledge=False), protocol.items, lists), lists)


def test_rewards_from_encoded_samples(ml100k):
    protocol, emb = ml100k
    lists = list_tensors(protocol.lists)
    torch.manual_seed(0)
    model = build_recommender(RecommendConfig(device="cpu"), protocol.items, lists, emb.dim, (emb.item_index, emb.item_vectors), emb.encoder)
    train_users = protocol.users.loc[protocol.users["split"] == "train", "user_index"].to_numpy()[:30]
    table = RewardScorer(model, lists).score_embeddings(emb, users=train_users)
    assert set(table.columns) == {"user_index", "sample", "reward"}
    assert set(table["sample"]) == {0, 1, 2} and table["user_index"].isin(train_users).all()


def test_listwise_rewards_leave_out_lists_without_a_negative(ml100k):
    """Per user: the mean over lists with a positive and a negative of the positives' mean log-softmax, by predict()."""
    protocol, emb = ml100k
    lists = list_tensors(protocol.lists)
    train_users = protocol.users.loc[protocol.users["split"] == "train", "user_index"].to_numpy()[:30]
    owner = lists.user_index.numpy()
    first = np.flatnonzero((owner == train_users[0]) & (lists.split == "train"))
    lists.labels[first[0]] = 1  # one list of positives only: no order to reward
    only = np.flatnonzero((owner == train_users[1]) & (lists.split == "train"))
    lists.labels[only] = 1  # a user whose every list is all positive: no reward at all
    torch.manual_seed(0)
    model = build_recommender(RecommendConfig(device="cpu"), protocol.items, lists, emb.dim, (emb.item_index, emb.item_vectors), emb.encoder)
    vectors = np.random.default_rng(0).standard_normal((len(train_users), emb.dim)).astype(np.float32)
    rewards = RewardScorer(model, lists, max_pairs=50).score(train_users, vectors, reward="listwise")

    knowledge = user_knowledge(len(protocol.users), train_users, vectors)
    labels = lists.labels.numpy()
    counted = np.isin(owner, train_users) & (lists.split == "train") & (labels.max(1) > 0) & (labels.min(1) == 0)
    mine = lists.subset(np.flatnonzero(counted))
    scores = torch.as_tensor(predict(model, mine, knowledge)).double()
    positive = mine.labels.double()
    per_list = ((torch.log_softmax(scores, 1) * positive).sum(1) / positive.sum(1)).numpy()
    expected = np.array([per_list[mine.user_index.numpy() == u].mean() if (mine.user_index.numpy() == u).any() else np.nan
                         for u in train_users])
    assert np.isnan(rewards[1]) and np.isnan(expected[1]) and not np.isnan(rewards[0])
    np.testing.assert_allclose(rewards, expected, atol=1e-4)


def test_split_half_reliability_scores_alternate_validation_lists(ml100k):
    protocol, emb = ml100k
    lists = list_tensors(protocol.lists)
    torch.manual_seed(0)
    model = build_recommender(RecommendConfig(device="cpu"), protocol.items, lists, emb.dim, (emb.item_index, emb.item_vectors), emb.encoder)
    scorer = RewardScorer(model, lists)
    users = protocol.users.loc[protocol.users["split"] == "validation", "user_index"].to_numpy()[:5]
    before = lists.split.copy()
    halved = halves(scorer, users)
    assert (scorer.lists.split == before).all()  # the scorer is left as it was
    owner = lists.user_index.numpy()
    for user in users:
        mine = halved.lists.split[(owner == user) & (before == "validation")]
        assert list(mine) == ["half_a", "half_b"] * (len(mine) // 2) + ["half_a"] * (len(mine) % 2)
    assert (halved.lists.split[~np.isin(owner, users)] == before[~np.isin(owner, users)]).all()
    vectors = np.random.default_rng(0).standard_normal((len(users) * 4, emb.dim)).astype(np.float32)
    samples = type("Samples", (), {"user_index": np.repeat(users, 4), "sample": np.tile(np.arange(4), len(users)), "user_vectors": vectors})
    out = split_half_reliability(scorer, samples, users, "loglik")
    assert out["users"] == len(users) and out["pair_agreement_pairs"] == 3 * len(users) - 3 * out["tied_users"]
    # by hand: each user's sampled texts (sample > 0) rewarded on either half, pairs ordered alike (a tie on b: half)
    keep = samples.sample > 0
    ra, rb = (halved.score(samples.user_index[keep], vectors[keep], half, reward="loglik") for half in ("half_a", "half_b"))
    owners, hits = samples.user_index[keep], []
    for user in users:
        rows = np.flatnonzero(owners == user)
        for i, j in ((i, j) for k, i in enumerate(rows) for j in rows[k + 1:]):
            if ra[i] != ra[j] and not np.isnan(ra[i] - ra[j] + rb[i] - rb[j]):
                hits.append(0.5 if rb[i] == rb[j] else float(np.sign(ra[i] - ra[j]) == np.sign(rb[i] - rb[j])))
    assert len(hits) == out["pair_agreement_pairs"] and out["pair_agreement"] == pytest.approx(np.mean(hits))


def test_ensemble_reward_is_the_mean_of_its_recommenders(ml100k):
    """Two recommenders of different seeds: the ensemble's reward of each sample is the mean of theirs, on any split,
    and its halves (split-half reliability) relabel every member's lists alike."""
    protocol, emb = ml100k
    lists = list_tensors(protocol.lists)
    members = []
    for seed in (0, 1):
        config = RecommendConfig(device="cpu", seed=seed)
        members.append(RewardScorer(build_recommender(config, protocol.items, lists, emb.dim, (emb.item_index, emb.item_vectors), emb.encoder), lists))
    ensemble = EnsembleScorer(members)
    users = protocol.users.loc[protocol.users["split"] == "validation", "user_index"].to_numpy()[:6]
    vectors = np.random.default_rng(0).standard_normal((len(users) * 3, emb.dim)).astype(np.float32)
    rows = np.repeat(users, 3)
    for reward in ("loglik", "listwise"):
        each = [m.score(rows, vectors, "validation", reward=reward) for m in members]
        assert not np.allclose(each[0], each[1])  # the seeds' models differ
        np.testing.assert_allclose(ensemble.score(rows, vectors, "validation", reward=reward), (each[0] + each[1]) / 2)
    halved = halves(ensemble, users)
    assert isinstance(halved, EnsembleScorer) and all((m.lists.split == halved.lists.split).all() for m in halved.scorers)
    assert (ensemble.lists.split == lists.split).all()  # the ensemble is left as it was
    np.testing.assert_allclose(halved.score(rows, vectors, "half_a", reward="loglik"),
                               np.mean([halves(m, users).score(rows, vectors, "half_a", reward="loglik") for m in members], axis=0))
    with pytest.raises(InputError, match="at least one"):
        EnsembleScorer([])
