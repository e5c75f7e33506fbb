"""The reward API the DPO stage calls.

A knowledge text's reward is the trained recommender's mean NDCG@5 over the
user's lists (default: the train lists) with that text's vector plugged in as
the user's knowledge, or one of the continuous rewards of ``REWARDS``. Lists
without a positive carry no signal (every ranking of them scores the same)
and are left out; a user with no such list gets no reward (NaN). Scoring is batched over users and samples together:
the sample-independent part of each list (ids, attributes, item-knowledge
tower, personal vector) is computed once per list, and only the user tower
and the ranking layers run per (list, sample) pair.

    scorer = RewardScorer.from_run("runs/x", round_index=0, name="prm")
    rewards = scorer.score(user_index, vectors)          # (M,) one per row
    table = scorer.score_embeddings(read_embeddings(...))  # user_index, sample, reward
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dpo4rec.artifacts import read_parquet
from dpo4rec.config import REWARDS
from dpo4rec.errors import InputError
from dpo4rec.metrics import rerank_metrics
from dpo4rec.recommend.checkpoint import load_recommender
from dpo4rec.recommend.features import ListTensors, list_tensors, mark_reward_lists
from dpo4rec.recommend.models import Reranker


# Cosines of two texts' vectors span ~0.1-0.5 within a list; over 0.05 they make a softmax that is neither flat nor one-hot.
TEXT_MATCH_TEMPERATURE = 0.05


def list_rewards(kind: str, scores: torch.Tensor, labels: torch.Tensor, model, k: int = 5) -> np.ndarray:
    """One reward per list from the recommender's scores (P, L) and the labels (P, L).

    ndcg: NDCG@k as KAR computes it. loglik: the list's log-likelihood under the model's own loss. listwise: the mean
    log-probability that a softmax over the list's scores gives its positives (ListNet's top-one
    likelihood): only the order counts, a shift of all of a list's scores changes nothing. A list
    without a negative has no order to get right: NaN, left out of the user's average.
    """
    if kind not in REWARDS:
        raise InputError(f"align.reward must be one of {', '.join(REWARDS)}, got {kind!r}")
    if kind == "loglik":
        return model.list_log_likelihood(scores.float(), labels.float()).cpu().numpy().astype(np.float64)
    if kind == "listwise":
        positive = (labels > 0).float()
        log_probs = torch.log_softmax(scores.float(), dim=1)
        values = (log_probs * positive).sum(1) / positive.sum(1).clamp_min(1)
        values = torch.where((positive.sum(1) > 0) & (positive.sum(1) < labels.shape[1]), values, float("nan"))
        return values.cpu().numpy().astype(np.float64)
    return rerank_metrics(labels.cpu().numpy(), scores.float().cpu().numpy(), ks=(k,))[f"ndcg@{k}"]


class ListScorer:
    """Per-sample rewards over each user's re-rank lists; a subclass says how a list's candidates score a text
    (``_pair_rewards``) and what vectors it takes (``_expected_dim``)."""

    def __init__(self, lists: ListTensors, max_pairs: int, device: torch.device):
        self.lists = lists
        self.max_pairs = max_pairs  # (list, sample) pairs per forward pass: bounds memory
        self.device = device

    def with_lists(self, lists: ListTensors) -> ListScorer:
        """The same scorer on other lists (e.g. the same lists with another split column); its weights shared."""
        other = copy.copy(self)
        other.lists = lists
        return other

    @torch.inference_mode()
    def score(self, user_index: np.ndarray, vectors: np.ndarray, split: str | None = "train", k: int = 5,
              reward: str = "ndcg") -> np.ndarray:
        """Mean reward over each row's user's lists (of ``split``; None = all) that hold a positive, row ``i`` using ``vectors[i]``.

        ``user_index`` (M,) may repeat a user (one row per sample); ``vectors``
        (M, dim). ``reward``: see ``list_rewards``. Users whose lists hold no
        positive get NaN.
        """
        user_index = np.asarray(user_index, dtype=np.int64)
        vectors = np.asarray(vectors, dtype=np.float32)
        self._check(user_index, vectors)
        rows_by_user = np.argsort(user_index, kind="stable")
        users, first_row, n_rows = np.unique(user_index[rows_by_user], return_index=True, return_counts=True)
        list_rows, list_start, n_lists = self._lists_of(users, split)
        rewards = np.full(len(user_index), np.nan, np.float64)
        for group in self._groups(n_lists * n_rows):
            group = group[n_lists[group] > 0]
            if len(group) == 0:
                continue
            rows = np.concatenate([rows_by_user[first_row[g] : first_row[g] + n_rows[g]] for g in group])
            lists = np.concatenate([list_rows[list_start[g] : list_start[g] + n_lists[g]] for g in group])
            # pair (row r, list l) for every sample row and every list of the same user
            local = np.concatenate([[0], np.cumsum(n_lists[group])])
            pair_row, pair_list, at = [], [], 0
            for j, g in enumerate(group):
                span = np.arange(local[j], local[j + 1])
                pair_row.append(np.repeat(np.arange(at, at + n_rows[g]), n_lists[g]))
                pair_list.append(np.tile(span, n_rows[g]))
                at += n_rows[g]
            pair_row, pair_list = np.concatenate(pair_row), np.concatenate(pair_list)
            values = self._pair_rewards(lists, vectors[rows], pair_row, pair_list, k, reward)
            counted = ~np.isnan(values)  # "listwise" leaves out lists without a negative
            with np.errstate(invalid="ignore"):  # a user with no counted list gets NaN (no reward)
                rewards[rows] = (np.bincount(pair_row[counted], weights=values[counted], minlength=len(rows))
                                 / np.bincount(pair_row[counted], minlength=len(rows)))
        return rewards

    def score_embeddings(self, embeddings, split: str | None = "train", users: np.ndarray | None = None, k: int = 5,
                         reward: str = "ndcg") -> pd.DataFrame:
        return score_embeddings(self, embeddings, split, users, k, reward)

    def _check(self, user_index: np.ndarray, vectors: np.ndarray) -> None:
        dim, expects = self._expected_dim()
        if vectors.ndim != 2 or vectors.shape[1] != dim:
            raise InputError(f"knowledge vectors have shape {vectors.shape}, {expects}")
        if len(user_index) != len(vectors):
            raise InputError(f"{len(user_index)} user indices but {len(vectors)} vectors")
        if not np.isfinite(vectors).all():
            raise InputError("knowledge vectors contain NaN or infinity")

    def _lists_of(self, users: np.ndarray, split: str | None):
        """Rows of each user's lists that hold a positive: (rows grouped by user, start per user, count per user).

        A user with lists of ``split`` but none with a positive gets count 0 (no
        reward); a user with no lists of ``split`` at all is an error.
        """
        owner = self.lists.user_index.numpy()
        selected = np.isin(owner, users) if split is None else np.isin(owner, users) & (self.lists.split == split)
        present = np.isin(users, owner[selected])
        selected &= self.lists.labels.numpy().max(1) > 0
        rows = np.flatnonzero(selected)
        rows = rows[np.argsort(owner[rows], kind="stable")]
        start = np.searchsorted(owner[rows], users, side="left")
        count = np.searchsorted(owner[rows], users, side="right") - start
        if not present.all():
            empty = users[~present]
            raise InputError(f"{len(empty)} users have no {split or ''} lists to score (first: user_index {empty[0]}); "
                             f"rewards come from {split or 'any'} lists" + (", so use train users" if split == "train" else ""))
        return rows, start, count

    def _groups(self, pairs_per_user: np.ndarray):
        """Consecutive users whose (list, sample) pairs fit in ``max_pairs`` (a big user goes alone)."""
        group, total = [], 0
        for g, pairs in enumerate(pairs_per_user):
            if group and total + pairs > self.max_pairs:
                yield np.asarray(group)
                group, total = [], 0
            group.append(g)
            total += pairs
        if group:
            yield np.asarray(group)


class RewardScorer(ListScorer):
    """Per-sample rewards from a trained, knowledge-augmented re-ranker."""

    def __init__(self, model: Reranker, lists: ListTensors, max_pairs: int = 16384):
        if not model.knowledge:
            raise InputError("the reward needs a recommender trained with knowledge (recommend.knowledge = true)")
        super().__init__(lists, max_pairs, next(model.parameters()).device)
        self.model = model.eval()

    @classmethod
    def from_folders(cls, recommender_folder: str | Path, data_folder: str | Path, device: str = "cpu",
                     reward_holdout: float = 0.0) -> RewardScorer:
        """Load a recommend-stage folder and the data stage's lists.

        ``reward_holdout`` > 0 relabels each train user's last lists as split
        "reward", as the held-out reward recommender was trained (score with
        ``split="reward"``).
        """
        lists_path = Path(data_folder) / "lists.parquet"
        if not lists_path.is_file():
            raise InputError(f"{lists_path} not found; run the data stage first")
        lists = read_parquet(lists_path)
        if reward_holdout > 0:
            lists = mark_reward_lists(lists, reward_holdout)
        return cls(load_recommender(recommender_folder, device), list_tensors(lists))

    @classmethod
    def from_run(cls, run_dir: str | Path, round_index: int = 0, name: str = "prm", device: str = "cpu") -> RewardScorer:
        """The recommender ``name`` (its folder under round_<t>/recommend/) of a run."""
        run_dir = Path(run_dir)
        return cls.from_folders(run_dir / f"round_{round_index}" / "recommend" / name, run_dir / "data", device)

    def _expected_dim(self) -> tuple[int, str]:
        """The knowledge vectors' dimension, and who expects it (for the error)."""
        dim = self.model.spec.knowledge_dim
        return dim, f"the recommender expects (n, {dim}) (encoder {self.model.spec.encoder})"

    def _pair_rewards(self, lists: np.ndarray, vectors: np.ndarray, pair_row: np.ndarray, pair_list: np.ndarray, k: int,
                      reward: str) -> np.ndarray:
        model, dev = self.model, self.device
        idx = torch.as_tensor(lists)
        candidates, personal = model.list_context(self.lists.items[idx].to(dev), self.lists.history[idx].to(dev))  # once per list
        user_out = model.user_tower(torch.as_tensor(vectors, device=dev))  # (R, adapter_dim), once per sample
        pl, pr = torch.as_tensor(pair_list, device=dev), torch.as_tensor(pair_row, device=dev)
        scores = model.rank(model.join(candidates[pl], user_out[pr]), personal[pl])  # (P, L)
        labels = self.lists.labels[idx].to(dev)[pl]
        return list_rewards(reward, scores, labels, model, k)


class TextMatchScorer(ListScorer):
    """Rewards from a recommender with no parameters (``align.reward_model = "text_match"``): each candidate of
    a list scores the cosine between the user's text vector and the item's text vector, over
    ``TEXT_MATCH_TEMPERATURE`` (the scale only matters to "listwise"). A text earns reward by being close, in the
    encoder's space, to the items the user goes on to like rather than to the list's other candidates; nothing
    is trained, so the reward has no seed and the same text always gets the same reward."""

    def __init__(self, item_index: np.ndarray, item_vectors: np.ndarray, lists: ListTensors, max_pairs: int = 16384):
        item_index = np.asarray(item_index, dtype=np.int64)
        table = np.zeros((max(int(item_index.max()), int(lists.items.max())) + 1, item_vectors.shape[1]), np.float32)
        table[item_index] = item_vectors
        missing = np.setdiff1d(np.unique(lists.items.numpy()), item_index)
        if len(missing):
            raise InputError(f"{len(missing)} items of the lists have no text vector (first: item_index {missing[0]}); "
                             "were the embeddings made from another data run?")
        super().__init__(lists, max_pairs, torch.device("cpu"))
        self.item_vectors = torch.nn.functional.normalize(torch.from_numpy(table), dim=1)

    @classmethod
    def from_folders(cls, embeddings_folder: str | Path, data_folder: str | Path, item_knowledge: bool = True,
                     reward_holdout: float = 0.0) -> TextMatchScorer:
        """A round's item vectors (encode stage) and the data stage's lists (``reward_holdout``: as RewardScorer's)."""
        from dpo4rec.encode import read_embeddings

        lists_path = Path(data_folder) / "lists.parquet"
        if not lists_path.is_file():
            raise InputError(f"{lists_path} not found; run the data stage first")
        lists = read_parquet(lists_path)
        embeddings = read_embeddings(embeddings_folder, item_knowledge)
        return cls(embeddings.item_index, embeddings.item_vectors, list_tensors(mark_reward_lists(lists, reward_holdout) if reward_holdout > 0 else lists))

    def _expected_dim(self) -> tuple[int, str]:
        dim = int(self.item_vectors.shape[1])
        return dim, f"the item vectors have dimension {dim}"

    def _pair_rewards(self, lists: np.ndarray, vectors: np.ndarray, pair_row: np.ndarray, pair_list: np.ndarray, k: int,
                      reward: str) -> np.ndarray:
        if reward == "loglik":
            raise InputError('align.reward = "loglik" needs a trained recommender, not align.reward_model = "text_match"')
        idx = torch.as_tensor(lists)
        users = torch.nn.functional.normalize(torch.as_tensor(vectors), dim=1)  # (R, d)
        items = self.item_vectors[self.lists.items[idx]]  # (lists, L, d)
        pl, pr = torch.as_tensor(pair_list), torch.as_tensor(pair_row)
        scores = torch.einsum("pld,pd->pl", items[pl], users[pr]) / TEXT_MATCH_TEMPERATURE
        return list_rewards(reward, scores, self.lists.labels[idx][pl], None, k)


def score_embeddings(scorer, embeddings, split: str | None = "train", users: np.ndarray | None = None, k: int = 5,
                     reward: str = "ndcg") -> pd.DataFrame:
    """Rewards for an encode-stage ``Embeddings`` (optionally only ``users``): user_index, sample, reward."""
    keep = np.ones(len(embeddings.user_index), bool) if users is None else np.isin(embeddings.user_index, users)
    rewards = scorer.score(embeddings.user_index[keep], embeddings.user_vectors[keep], split, k, reward)
    return pd.DataFrame({"user_index": embeddings.user_index[keep], "sample": embeddings.sample[keep], "reward": rewards})


class EnsembleScorer:
    """The mean reward of several reward recommenders (the same data and texts, trained with different seeds).

    One trained recommender's preference between two of a user's texts is partly its own: retrained with another
    seed, it agrees on a pair far less often than with itself (docs/results.md, issue 9 section 10). Averaging
    over trainings keeps what they share.
    """

    def __init__(self, scorers: list[RewardScorer]):
        if not scorers:
            raise InputError("an ensemble reward needs at least one recommender")
        self.scorers = scorers
        self.lists = scorers[0].lists

    def score(self, user_index: np.ndarray, vectors: np.ndarray, split: str | None = "train", k: int = 5,
              reward: str = "ndcg") -> np.ndarray:
        return np.mean([s.score(user_index, vectors, split, k, reward) for s in self.scorers], axis=0)

    def score_embeddings(self, embeddings, split: str | None = "train", users: np.ndarray | None = None, k: int = 5,
                         reward: str = "ndcg") -> pd.DataFrame:
        return score_embeddings(self, embeddings, split, users, k, reward)

    def with_lists(self, lists: ListTensors) -> EnsembleScorer:
        return EnsembleScorer([s.with_lists(lists) for s in self.scorers])
