"""Is there a preference DPO could carry to unseen users? A linear probe of the reward.

Held-out pair accuracy (heldout/stage.py) can only rise where the reward's
preference between two of a user's texts is shared across users: DPO learns
from the train users' pairs and is checked on other users. The probe measures
how much of the preference is shared, with the simplest learner that sees what
the reward sees: a ridge regression from the text's vector (the encoder the
reward reads) and its length in tokens to the reward, both centred within each
user (only which of a user's texts is better counts), fitted on the sampled
train users' texts and read on the validation users' pairs as the held-out
check reads them (every two samples whose rewards differ; 95% bootstrap over
users). Its ridge penalty is picked by cross-validation over train users alone,
so validation users choose nothing.

A probe at chance says the reward gives DPO nothing to carry at this number of
train users; a probe above chance with DPO at chance says the limit is DPO
(docs/results.md, issue 9 section 15). It is not a strict ceiling for DPO,
which also reads the prompt, nor a floor: it sees reward values, DPO only
which text won.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dpo4rec.reward.reliability import agreement

ALPHAS = (0.1, 1.0, 10.0, 100.0)
FOLDS = 5


def centred(values: np.ndarray, users: np.ndarray) -> np.ndarray:
    """``values`` (rows, or rows x features) minus each user's mean."""
    frame = pd.DataFrame(values)
    return (frame - frame.groupby(users).transform("mean")).to_numpy().reshape(np.shape(values))


def ridge(features: np.ndarray, target: np.ndarray, alpha: float) -> np.ndarray:
    """Weights minimizing |features @ w - target|^2 + alpha |w|^2 (no intercept: the data are centred)."""
    gram = features.T @ features + alpha * np.eye(features.shape[1])
    return np.linalg.solve(gram, features.T @ target)


def pick_alpha(features: np.ndarray, target: np.ndarray, users: np.ndarray, seed: int = 0) -> float:
    """The ridge penalty with the least squared error on held-out folds of users (``FOLDS``, at most one per user)."""
    distinct = np.random.default_rng(seed).permutation(np.unique(users))
    folds = np.array_split(distinct, min(FOLDS, len(distinct)))
    errors = []
    for alpha in ALPHAS:
        error = 0.0
        for fold in folds:
            out = np.isin(users, fold)
            weights = ridge(features[~out], target[~out], alpha)
            error += float(((features[out] @ weights - target[out]) ** 2).sum())
        errors.append(error)
    return ALPHAS[int(np.argmin(errors))]


def probe_features(rewards: pd.DataFrame, embeddings, knowledge: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """The sampled texts of ``rewards`` that have a reward, and their features: the text's vector and its tokens."""
    table = rewards.loc[(rewards["sample"] > 0) & rewards["reward"].notna(), ["user_index", "sample", "reward"]].reset_index(drop=True)
    row_of = pd.Series(np.arange(len(embeddings.user_index)),
                       index=pd.MultiIndex.from_arrays([embeddings.user_index, embeddings.sample]))
    vectors = np.asarray(embeddings.user_vectors, dtype=np.float64)[row_of.loc[list(zip(table["user_index"], table["sample"]))].to_numpy()]
    tokens = knowledge.set_index(["user_index", "sample"])["n_tokens"].reindex(pd.MultiIndex.from_frame(table[["user_index", "sample"]]))
    return table, np.hstack([vectors, tokens.to_numpy(dtype=np.float64)[:, None] / 64.0])


def _centred_training(rewards: pd.DataFrame, embeddings, knowledge: pd.DataFrame):
    """``rewards``' sampled texts with a reward (table), the users of its rows, and its features and rewards centred
    within users: what every fit of the probe reads."""
    table, features = probe_features(rewards, embeddings, knowledge)
    users = table["user_index"].to_numpy()
    return table, users, centred(features, users), centred(table["reward"].to_numpy(dtype=np.float64), users)


def fit_probe(rewards: pd.DataFrame, embeddings, knowledge: pd.DataFrame, seed: int = 0) -> tuple[np.ndarray, float, int]:
    """The probe fitted on every user of ``rewards``: (weights over ``probe_features``' columns, ridge penalty, users);
    users = 0 (and no weights) when fewer than two users have sampled texts with rewards."""
    _, users, x, y = _centred_training(rewards, embeddings, knowledge)
    n_users = int(pd.Series(users).nunique())
    if n_users < 2:
        return np.zeros(0), float("nan"), 0
    alpha = pick_alpha(x, y, users, seed)
    return ridge(x, y, alpha), alpha, n_users


def reward_probe(embeddings, knowledge: pd.DataFrame, train_rewards: pd.DataFrame, validation_rewards: pd.DataFrame,
                 seed: int = 0) -> dict:
    """The probe's pair accuracy on the validation users (``pair_accuracy`` and its ``_ci95``, ``best_worst_accuracy``),
    fitted on the train users' sampled texts. Rewards: user_index, sample, reward; ``embeddings``: the encode stage's
    (user_index, sample, user_vectors); ``knowledge``: user_index, sample, n_tokens."""
    weights, alpha, n_users = fit_probe(train_rewards, embeddings, knowledge, seed)
    validation, x_validation = probe_features(validation_rewards, embeddings, knowledge)
    if n_users == 0 or validation.empty:
        return {"skipped": "fewer than two sampled train users, or no sampled validation texts, with rewards"}
    scores = validation.assign(reward=x_validation @ weights)  # centring would not change a user's order
    found = agreement(validation, scores, seed)
    out = {"train_users": n_users, "alpha": alpha, "users": found["users"]}
    for name in ("pair", "best_worst"):
        if f"{name}_agreement" in found:
            out.update({f"{name}_accuracy": found[f"{name}_agreement"], f"{name}_accuracy_ci95": found[f"{name}_agreement_ci95"],
                        f"{name}_pairs": found[f"{name}_agreement_pairs"]})
    return out
