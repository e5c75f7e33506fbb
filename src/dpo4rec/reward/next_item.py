"""Rewards under the next-item protocol: how a text moves the user's validation target among all items.

Every user's reward target is their validation target (the second-to-last
item), which no recommender trains on; the input is every item before it.
Per (user, text) row, the text's vector joins the sequence's query vector (the
sequence part is computed once per user) and every item is scored:

* "loglik" and "listwise": the log-probability a softmax over the candidates
  gives the target (the candidates as in evaluation: the user's earlier items
  left out), continuous, no ties;
* "ndcg": 1 / log2(rank + 2) over the full ranking, no cutoff: NDCG@5 among
  ~12,000 items is 0 for nearly every text, and would tie them all.

``align.reward_model = "text_match"`` scores each item by the cosine between the
text's vector and the item's text vector (over TEXT_MATCH_TEMPERATURE) instead
of by SASRec: no training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dpo4rec.artifacts import read_parquet
from dpo4rec.config import REWARDS
from dpo4rec.data.next_item import run_sequences
from dpo4rec.errors import InputError
from dpo4rec.recommend.checkpoint import load_recommender
from dpo4rec.recommend.sequential import VALIDATION_CUT, Targets, candidates_only, next_item_targets, target_ranks
from dpo4rec.reward.scorers import TEXT_MATCH_TEMPERATURE, score_embeddings


class NextItemScorer:
    """Per-row rewards from a trained knowledge-augmented SASRec (``model``), or from text matching (``item_vectors``)."""

    def __init__(self, targets: Targets, model=None, item_vectors: torch.Tensor | None = None, batch_rows: int = 512):
        if (model is None) == (item_vectors is None):
            raise ValueError("give a model or item vectors")
        if model is not None and not model.knowledge:
            raise InputError("the reward needs a recommender trained with knowledge (recommend.knowledge = true)")
        self.targets, self.model, self.batch_rows = targets, model, batch_rows
        self.item_vectors = None if item_vectors is None else torch.nn.functional.normalize(item_vectors.float(), dim=1)
        self.row_of = {int(u): i for i, u in enumerate(targets.user_index.tolist())}
        self.lists = None  # no re-rank lists: the split-half reliability does not apply

    @classmethod
    def from_folders(cls, data_folder: str | Path, recommender_folder: str | Path | None = None, item_vectors=None,
                     device: str = "cpu") -> NextItemScorer:
        """Every user's validation target from the data stage, with the recommender of ``recommender_folder``
        or ``item_vectors`` = (item_index, vectors) of the encode stage (text matching)."""
        data_folder = Path(data_folder)
        users = read_parquet(data_folder / "users.parquet")
        sequences = run_sequences(read_parquet(data_folder / "interactions.parquet"), len(users))
        model = load_recommender(recommender_folder, device) if recommender_folder is not None else None
        max_len = model.spec.history_len if model is not None else 1  # text matching reads no sequence
        targets = next_item_targets(sequences, np.arange(len(users)), VALIDATION_CUT, max_len)
        table = None
        if item_vectors is not None:
            index, vectors = item_vectors
            n_rows = int(max(np.max(index), max(int(s.max()) for s in sequences))) + 1
            table = torch.zeros(n_rows, vectors.shape[1])
            table[torch.as_tensor(np.asarray(index, np.int64))] = torch.as_tensor(np.asarray(vectors, np.float32))
        return cls(targets, model, table)

    @torch.inference_mode()
    def score(self, user_index: np.ndarray, vectors: np.ndarray, split: str | None = "train", k: int = 5, reward: str = "ndcg") -> np.ndarray:
        """One reward per row (``vectors[i]`` as user ``user_index[i]``'s text); ``split`` and ``k`` are the re-rank
        scorer's and change nothing here (the target is always the validation item, the ranking always full)."""
        if reward not in REWARDS:
            raise InputError(f"align.reward must be one of {', '.join(REWARDS)}, got {reward!r}")
        user_index, vectors = np.asarray(user_index, np.int64), np.asarray(vectors, np.float32)
        if len(user_index) != len(vectors):
            raise InputError(f"{len(user_index)} user indices but {len(vectors)} vectors")
        if not np.isfinite(vectors).all():
            raise InputError("knowledge vectors contain NaN or infinity")
        missing = [u for u in np.unique(user_index) if int(u) not in self.row_of]
        if missing:
            raise InputError(f"user_index {missing[0]} has no validation target in the data stage")
        rows = np.array([self.row_of[int(u)] for u in user_index], dtype=np.int64)
        out = np.empty(len(rows), np.float64)
        for start in range(0, len(rows), self.batch_rows):
            part = slice(start, start + self.batch_rows)
            scores = self._scores(rows[part], torch.from_numpy(vectors[part]))
            target = self.targets.target[rows[part]]
            seen = [self.targets.seen[r] for r in rows[part]]
            if reward == "ndcg":
                out[part] = 1.0 / np.log2(target_ranks(scores, target, seen).numpy() + 2.0)
            else:
                out[part] = self._log_probability(scores, target, seen)
        return out

    def score_embeddings(self, embeddings, split: str | None = "train", users: np.ndarray | None = None, k: int = 5,
                         reward: str = "ndcg") -> pd.DataFrame:
        return score_embeddings(self, embeddings, split, users, k, reward)

    def _scores(self, rows: np.ndarray, vectors: torch.Tensor) -> torch.Tensor:
        """(R, n_items + 1) scores of every item for each row."""
        if self.model is None:
            if vectors.shape[1] != self.item_vectors.shape[1]:
                raise InputError(f"knowledge vectors have dimension {vectors.shape[1]}, the item vectors {self.item_vectors.shape[1]}")
            return torch.nn.functional.normalize(vectors, dim=1) @ self.item_vectors.T / TEXT_MATCH_TEMPERATURE
        model = self.model
        device = next(model.parameters()).device
        distinct, inverse = np.unique(rows, return_inverse=True)  # the sequence part once per user
        items, lengths = self.targets.items[distinct], self.targets.lengths[distinct]
        table = model.item_table()
        queries = model.encode(items[:, : int(lengths.max())].to(device), lengths.to(device), table)
        last = queries[torch.arange(len(distinct), device=device), lengths.to(device) - 1][torch.from_numpy(inverse).to(device)]
        return (model.join_user(last, vectors.to(device), None) @ table.T).float().cpu()

    @staticmethod
    def _log_probability(scores: torch.Tensor, target: torch.Tensor, seen: list[np.ndarray]) -> np.ndarray:
        """log softmax at the target over the candidates (padding and the user's earlier items out, the target in)."""
        rows = torch.arange(len(target))
        return torch.log_softmax(candidates_only(scores, target, seen), dim=1)[rows, target].double().numpy()
