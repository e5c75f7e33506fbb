"""Training and evaluation of a sequential recommender (SASRec) on the next-item protocol.

Leave-one-out per user (data/next_item.py): of a time-ordered sequence, the
last item is the test target and the one before it the validation target.

* Training reads each user's sequence without both targets and learns, at
  every position, the item that came next: cross-entropy over all items (the
  padding row excluded), from the model's query vector at that position.
* Validation scores the validation target from the items before it; test scores
  the test target from every item before it, the validation item included (as
  SASRec's and RecBole's code do: by then it is part of the history).
* Full ranking: every item is a candidate except those the user interacted
  with before the target (they are history, not recommendations; RecBole and
  the S3-Rec code exclude them too); the target itself always stays in, also
  when the user had it before. Ties are broken against the target: its rank is
  the number of other candidates scoring at least as high.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from dpo4rec.config import RecommendConfig
from dpo4rec.devices import resolve_device
from dpo4rec.errors import InputError
from dpo4rec.metrics import full_ranking_metrics, mean_metrics
from dpo4rec.recommend.features import UserKnowledge
from dpo4rec.recommend.train import TrainResult, _autocast, deterministic_kernels, fit_epochs

log = logging.getLogger(__name__)
SELECT_METRIC = "ndcg@10"
VALIDATION_CUT, TEST_CUT = 2, 1  # the target is this many items from the end


def pad_right(sequences: list[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's last ``max_len`` items, left-aligned in a zero-padded (R, longest) matrix, and the lengths."""
    kept = [np.asarray(s, dtype=np.int64)[-max_len:] for s in sequences]
    lengths = np.array([len(s) for s in kept], dtype=np.int64)
    matrix = np.zeros((len(kept), int(lengths.max(initial=1))), dtype=np.int64)
    for row, seq in enumerate(kept):
        matrix[row, : len(seq)] = seq
    return torch.from_numpy(matrix), torch.from_numpy(lengths)


@dataclass
class Targets:
    """Rows to score: the items before a target (right-padded), the target, and every earlier item to exclude."""

    items: torch.Tensor  # (R, T) int64, the last max_len items before the target
    lengths: torch.Tensor  # (R,)
    target: torch.Tensor  # (R,)
    user_index: torch.Tensor  # (R,)
    seen: list[np.ndarray]  # per row, every item before the target (the whole history, not only the last max_len)

    def __len__(self) -> int:
        return int(self.target.shape[0])


def next_item_targets(sequences: list[np.ndarray], user_index: np.ndarray, cut: int, max_len: int) -> Targets:
    """Per sequence, the item ``cut`` places from the end as target and everything before it as input."""
    prefixes, targets = [], []
    for seq in sequences:
        if len(seq) <= cut:
            raise InputError(f"a sequence of {len(seq)} items has no input before its target {cut} from the end")
        prefixes.append(np.asarray(seq[: len(seq) - cut]))
        targets.append(int(seq[len(seq) - cut]))
    items, lengths = pad_right(prefixes, max_len)
    return Targets(items, lengths, torch.tensor(targets, dtype=torch.long), torch.from_numpy(np.array(user_index, dtype=np.int64)),
                   [np.unique(p) for p in prefixes])


@dataclass
class NextItemData:
    """What a sequential model trains and is measured on."""

    train_items: torch.Tensor  # (R, max_len + 1): each training sequence, both targets removed, right-padded
    train_lengths: torch.Tensor  # (R,)
    train_users: torch.Tensor  # (R,) user_index
    validation: Targets
    test: Targets
    n_items: int
    selection: Targets | None = None  # the targets that pick the epoch; None = ``validation``

    @property
    def picks_epochs(self) -> Targets:
        return self.validation if self.selection is None else self.selection


def next_item_data(sequences: list[np.ndarray], max_len: int, validation_users: np.ndarray | None = None,
                   test_users: np.ndarray | None = None, n_items: int | None = None) -> NextItemData:
    """Leave-one-out tensors from per-user item sequences (index = user_index, items >= 1, time order).

    Every user's sequence trains (both targets removed); ``validation_users`` / ``test_users`` (default: all)
    are the users whose validation / test targets are scored; ``n_items`` the catalog's largest item index
    (default: the largest in the sequences).
    """
    n_users = len(sequences)
    if n_users == 0:
        raise InputError("no user sequences to train on")
    short = [u for u, s in enumerate(sequences) if len(s) < 3]
    if short:
        raise InputError(f"user_index {short[0]} has {len(sequences[short[0]])} interactions; the next-item protocol needs at least 3 per user")
    trainable = np.array([u for u, s in enumerate(sequences) if len(s) - 2 >= 2], dtype=np.int64)
    if len(trainable) == 0:
        raise InputError("no user has two items before the validation target: nothing to train on")
    items, lengths = pad_right([sequences[u][:-2] for u in trainable], max_len + 1)
    everyone = np.arange(n_users)
    val = everyone if validation_users is None else np.asarray(validation_users, dtype=np.int64)
    test = everyone if test_users is None else np.asarray(test_users, dtype=np.int64)
    return NextItemData(
        items, lengths, torch.from_numpy(trainable),
        next_item_targets([sequences[u] for u in val], val, VALIDATION_CUT, max_len),
        next_item_targets([sequences[u] for u in test], test, TEST_CUT, max_len),
        n_items=n_items or int(max(int(np.max(s)) for s in sequences)),
    )


def candidates_only(scores: torch.Tensor, target: torch.Tensor, seen: list[np.ndarray]) -> torch.Tensor:
    """A copy of (B, n_items + 1) ``scores`` with what is no candidate at -inf: column 0 (padding) and each row's
    seen items, except its target, which keeps its score (a repeated item can still be the next)."""
    masked = scores.float().clone()
    rows = torch.arange(masked.shape[0], device=masked.device)
    at_target = masked[rows, target]
    masked[:, 0] = float("-inf")
    if seen:
        seen_rows = torch.from_numpy(np.repeat(np.arange(len(seen)), [len(s) for s in seen])).to(masked.device)
        masked[seen_rows, torch.from_numpy(np.concatenate(seen).astype(np.int64)).to(masked.device)] = float("-inf")
    masked[rows, target] = at_target
    return masked


def target_ranks(scores: torch.Tensor, target: torch.Tensor, seen: list[np.ndarray]) -> torch.Tensor:
    """0-based rank of each row's target among the candidates (column 0 and the row's seen items excluded, ties against it)."""
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    masked = candidates_only(scores, target, seen)
    rows = torch.arange(masked.shape[0], device=masked.device)
    at_target = masked[rows, target].unsqueeze(1)  # (B, 1)
    masked[rows, target] = float("-inf")  # the target itself is not one of the others
    return (masked >= at_target).sum(1)


@torch.inference_mode()
def rank_targets(model, targets: Targets, knowledge: UserKnowledge | None, config: RecommendConfig | None = None,
                 batch_size: int = 1024) -> np.ndarray:
    """Each target's rank under the model (eval mode); the all-item scores of a batch are one matrix product."""
    config = config or RecommendConfig(device="cpu")
    device = next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(targets), batch_size):
        rows = slice(start, start + batch_size)
        users = targets.user_index[rows]
        vectors, known = (None, None) if knowledge is None else (knowledge.vectors[users].to(device), knowledge.known[users].to(device))
        items, lengths = targets.items[rows], targets.lengths[rows]
        width = int(lengths.max())
        with _autocast(config, device):
            scores = model(items[:, :width].to(device), lengths.to(device), vectors, known)
        out.append(target_ranks(scores, targets.target[rows].to(device), targets.seen[rows]).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def evaluate_next_item(model, targets: Targets, knowledge: UserKnowledge | None, config: RecommendConfig | None = None) -> dict[str, np.ndarray]:
    """Per-target HR@K and NDCG@K (K = 5, 10, 20) under full ranking."""
    return full_ranking_metrics(rank_targets(model, targets, knowledge, config))


def train_sequential(model, data: NextItemData, knowledge: UserKnowledge | None, config: RecommendConfig, progress: bool = True) -> TrainResult:
    """Fit with cross-entropy over all items; the epoch with the best NDCG@10 on ``data.picks_epochs`` is kept."""
    with deterministic_kernels():
        return _train(model, data, knowledge, config, progress)


def _train(model, data: NextItemData, knowledge, config: RecommendConfig, progress: bool) -> TrainResult:
    device = resolve_device(config.device, "recommend.device")
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    return fit_epochs(model, config, lambda epoch: _train_epoch(model, optimizer, data, knowledge, config, generator, device, progress, epoch),
                      lambda: mean_metrics(evaluate_next_item(model, data.picks_epochs, knowledge, config)), (SELECT_METRIC, "hr@10"))


def length_buckets(lengths: torch.Tensor, batch_size: int, generator: torch.Generator, pool: int = 64) -> list[torch.Tensor]:
    """Shuffled batches of rows of similar length: each pool of ``pool`` batches' worth of shuffled rows is sorted
    by length and cut into batches, and the batches are shuffled. A batch is padded to its longest row; on
    Beauty (mean length 9, max_len 50) random batches were ~88% padding and an epoch took 21 s, 2x this."""
    order = torch.randperm(len(lengths), generator=generator)
    batches = []
    for start in range(0, len(order), batch_size * pool):
        chunk = order[start : start + batch_size * pool]
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        batches.extend(chunk.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator)]


def _train_epoch(model, optimizer, data: NextItemData, knowledge, config, generator, device, progress, epoch) -> float:
    model.train()
    total, steps = 0.0, 0
    for rows in tqdm(length_buckets(data.train_lengths, config.batch_size, generator), desc=f"epoch {epoch}", unit="batch", disable=not progress, leave=False):
        lengths = data.train_lengths[rows]
        width = int(lengths.max())
        sequence = data.train_items[rows, :width].to(device)
        inputs, next_items, lengths = sequence[:, :-1], sequence[:, 1:], (lengths - 1).to(device)
        vectors = known = None
        if knowledge is not None:
            users = data.train_users[rows]
            vectors, known = knowledge.vectors[users].to(device), knowledge.known[users]
            if config.unknown_rate > 0:  # trains the vector that users without a text get
                known = known & (torch.rand(len(rows), generator=generator) >= config.unknown_rate)
            known = known.to(device)
        with _autocast(config, device):
            table = model.item_table()
            queries = model.join_user(model.encode(inputs, lengths, table), vectors, known)  # (B, T, d)
            real = next_items > 0
            logits = queries[real] @ table[1:].T  # (P, n_items): the padding row is no candidate
        loss = torch.nn.functional.cross_entropy(logits.float(), next_items[real] - 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, steps = total + loss.item(), steps + 1
    return total / max(steps, 1)


def build_sequential(config: RecommendConfig, n_items: int, knowledge_dim: int | None = None,
                     item_vectors: tuple[np.ndarray, np.ndarray] | None = None, encoder: str | None = None):
    """A fresh SASRec over items 1..n_items; ``item_vectors`` = (item_index, vectors) when knowledge is on."""
    from dpo4rec.recommend.features import item_knowledge
    from dpo4rec.recommend.models import ModelSpec, build_model

    spec = ModelSpec(backbone=config.backbone, n_items=n_items, list_size=0, history_len=config.max_len, knowledge_dim=knowledge_dim,
                     encoder=encoder, embed_dim=config.embed_dim, hidden_dim=config.hidden_dim, n_heads=config.n_heads,
                     n_layers=config.n_layers, dropout=config.dropout, shared_experts=config.shared_experts,
                     specific_experts=config.specific_experts, adapter_dim=config.embed_dim)
    torch.manual_seed(config.seed)  # the same seed gives the same initial weights
    model = build_model(spec)
    if knowledge_dim is not None:
        if item_vectors is None:
            raise InputError("knowledge is on but no item vectors were given")
        model.item_knowledge.copy_(item_knowledge(n_items + 1, *item_vectors))
    return model


def popularity_ranks(data: NextItemData, targets: Targets) -> np.ndarray:
    """Ranks under "most interacted first" (counts in the training sequences): the floor a model must beat."""
    counts = torch.bincount(data.train_items.flatten(), minlength=data.n_items + 1).float()
    return target_ranks(counts.expand(len(targets), -1), targets.target, targets.seen).numpy()


def fit_and_evaluate_sequential(build, data: NextItemData, knowledge: UserKnowledge | None, config: RecommendConfig, progress: bool = True):
    """Train ``config.seeds`` models (``build(config)`` makes a fresh one) and measure them on the validation and test
    targets beside popularity. Returns the first seed's model and the metrics (keys starting with _ are tables:
    one row per target, user_index and each metric, averaged over the seeds)."""
    model, results, per_seed = None, [], {"test": [], "validation": []}
    for offset in range(config.seeds):
        seeded = replace(config, seed=config.seed + offset)
        trained = build(seeded)
        results.append(train_sequential(trained, data, knowledge, seeded, progress))
        for split in ("test", "validation"):
            per_seed[split].append(evaluate_next_item(trained, getattr(data, split), knowledge, config))
        model = model or trained  # the first seed's is the one saved; the others are only measured
    tables = {}
    for split in ("test", "validation"):
        table = {"user_index": getattr(data, split).user_index.numpy()}
        table.update({m: np.mean([seed[m] for seed in per_seed[split]], axis=0) for m in per_seed[split][0]})
        if config.seeds > 1:
            table.update({f"{m}_seed{i + 1}": seed[m] for m in ("hr@10", "ndcg@10") for i, seed in enumerate(per_seed[split])})
        tables[split] = pd.DataFrame(table)
    result = results[0]
    metrics = {
        "model": model.spec.backbone,
        "knowledge": config.knowledge,
        "protocol": "next_item",
        "test": mean_metrics({m: tables["test"][m].to_numpy() for m in per_seed["test"][0]}),
        "validation": mean_metrics({m: tables["validation"][m].to_numpy() for m in per_seed["validation"][0]}),
        "baselines": {"popularity": mean_metrics(full_ranking_metrics(popularity_ranks(data, data.test)))},
        "best_epoch": result.best_epoch,
        "epochs": len(result.curve),
        "train_seconds": result.seconds,
        "seconds_per_epoch": float(np.mean([row["seconds"] for row in result.curve])),
        "targets": {"train_sequences": len(data.train_users), "validation": len(data.validation), "test": len(data.test)},
        "users_without_knowledge": None if knowledge is None else {
            split: int((~knowledge.known[getattr(data, split).user_index]).sum()) for split in ("validation", "test")},
    }
    if config.seeds > 1:
        metrics["seeds"] = [{"seed": config.seed + i, "best_epoch": r.best_epoch, "test": mean_metrics(t), "validation": mean_metrics(v)}
                            for i, (r, t, v) in enumerate(zip(results, per_seed["test"], per_seed["validation"]))]
    return model, {**metrics, "_curve": result.curve, "_test_lists": tables["test"], "_validation_lists": tables["validation"]}
