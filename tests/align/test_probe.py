"""The reward's linear probe (reward/probe.py): ridge by hand, and outcomes on rewards built to be (not) shared."""

import numpy as np
import pandas as pd
import pytest

from dpo4rec.reward.pairs import make_pairs
from dpo4rec.reward.probe import ALPHAS, centred, pick_alpha, reward_probe, ridge
from dpo4rec.encode.stage import Embeddings


def test_ridge_and_centring_by_hand():
    # x'x = 2, x'y = 4: w = 4 / (2 + alpha)
    assert ridge(np.array([[1.0], [-1.0]]), np.array([2.0, -2.0]), 2.0) == pytest.approx([1.0])
    values = np.array([[1.0, 10.0], [3.0, 20.0], [5.0, 7.0]])
    np.testing.assert_allclose(centred(values, np.array([0, 0, 1])), [[-1.0, -5.0], [1.0, 5.0], [0.0, 0.0]])
    np.testing.assert_allclose(centred(np.array([1.0, 3.0, 5.0]), np.array([0, 0, 1])), [-1.0, 1.0, 0.0])


def _texts(users, n_samples=4, dim=6, seed=0):
    """Embeddings of sampled texts (sample 1..n; the greedy sample 0 too, which the probe must leave out) and their tokens."""
    rng = np.random.default_rng(seed)
    user_index = np.repeat(users, n_samples + 1)
    sample = np.tile(np.arange(n_samples + 1), len(users))
    vectors = rng.normal(size=(len(user_index), dim)).astype(np.float32)
    knowledge = pd.DataFrame({"user_index": user_index, "sample": sample, "n_tokens": rng.integers(20, 65, len(user_index))})
    return user_index, sample, vectors, knowledge


def _case(reward_of, validation_sign=1.0):
    train, validation = np.arange(40), np.arange(100, 110)
    parts = [_texts(train, seed=1), _texts(validation, seed=2)]
    user_index, sample, vectors = (np.concatenate([p[i] for p in parts]) for i in range(3))
    knowledge = pd.concat([p[3] for p in parts], ignore_index=True)
    embeddings = Embeddings(user_index.astype(np.int64), sample.astype(np.int64), vectors, np.zeros(0, np.int64),
                            np.zeros((0, vectors.shape[1]), np.float32), "test")
    reward = reward_of(vectors.astype(np.float64), knowledge["n_tokens"].to_numpy(dtype=np.float64)) + 5.0 * (user_index % 3)
    table = pd.DataFrame({"user_index": user_index, "sample": sample, "reward": reward})
    is_validation = table["user_index"] >= 100
    table.loc[is_validation, "reward"] *= validation_sign
    return embeddings, knowledge, table[~is_validation], table[is_validation]


def test_a_shared_linear_preference_is_carried_to_validation_users():
    direction = np.array([1.0, -2.0, 0.5, 0.0, 0.0, 1.0])
    found = reward_probe(*_case(lambda v, tokens: v @ direction))
    # 10 validation users x every two of 4 samples with distinct rewards = 60 pairs, all ordered as the reward does
    assert found["pair_pairs"] == 60 and found["users"] == 10 and found["train_users"] == 40
    assert found["pair_accuracy"] == 1.0 and found["pair_accuracy_ci95"] == [1.0, 1.0] and found["best_worst_accuracy"] == 1.0
    assert found["alpha"] == min(ALPHAS)  # noiseless: cross-validation over train users wants the least shrinkage


def test_a_preference_reversed_on_unseen_users_scores_zero():
    found = reward_probe(*_case(lambda v, tokens: v[:, 0], validation_sign=-1.0))
    assert found["pair_accuracy"] == 0.0 and found["pair_accuracy_ci95"][1] == 0.0


def test_the_probe_sees_the_texts_length():
    found = reward_probe(*_case(lambda v, tokens: -tokens))  # shorter is better, whatever the text says
    assert found["pair_accuracy"] == 1.0


def test_a_reward_that_is_noise_leaves_the_probe_near_chance():
    noise = np.random.default_rng(7)
    found = reward_probe(*_case(lambda v, tokens: noise.normal(size=len(tokens))))
    assert found["pair_accuracy_ci95"][0] < 0.5 < found["pair_accuracy_ci95"][1]


def test_too_few_train_users_is_said_not_guessed():
    embeddings, knowledge, train, validation = _case(lambda v, tokens: v[:, 0])
    assert "skipped" in reward_probe(embeddings, knowledge, train[train["user_index"] == 0], validation)


def test_pick_alpha_prefers_shrinkage_for_noise():
    rng = np.random.default_rng(3)
    features, users = rng.normal(size=(200, 20)), np.repeat(np.arange(50), 4)
    assert pick_alpha(features, rng.normal(size=200), users) == max(ALPHAS)


def _pairs(scores, knowledge):
    texts = knowledge.assign(text=[f"t{u}-{k}" for u, k in zip(knowledge["user_index"], knowledge["sample"])])
    prompts = pd.DataFrame({"user_index": np.unique(scores["user_index"]), "message": "p"})
    return make_pairs(scores, texts, prompts, "best_worst").set_index("user_index")
