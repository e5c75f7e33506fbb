"""Training and evaluation of a re-ranker, and the recommend stage.

Train users' lists train (BCE, or the model's own list loss); validation
users' MAP@5 picks the epoch and stops training (``patience``); test users'
lists give the reported metrics, beside random and popularity rankings.

Users missing from the knowledge file: they get the model's learned
"unknown" vector, and are counted per split in metrics.json (and logged).
The vector is trained by swapping it in for a small share of training lists
(``recommend.unknown_rate``). A knowledge file that covers no train user at
all is an error: it belongs to another run.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from dpo4rec.config import RecommendConfig
from dpo4rec.devices import resolve_device
from dpo4rec.errors import InputError
from dpo4rec.metrics import mean_metrics, rerank_metrics
from dpo4rec.recommend.features import ListTensors, UserKnowledge, attribute_table, item_knowledge
from dpo4rec.recommend.models import ModelSpec, Reranker, build_model

log = logging.getLogger(__name__)
SELECT_METRIC = "map@5"


def build_recommender(config: RecommendConfig, items: pd.DataFrame, lists: ListTensors, knowledge_dim: int | None = None,
                      item_vectors: tuple[np.ndarray, np.ndarray] | None = None, encoder: str | None = None) -> Reranker:
    """A fresh model sized for the data; ``item_vectors`` = (item_index, vectors) when knowledge is on."""
    table, columns, vocab = attribute_table(items)
    spec = ModelSpec(
        backbone=config.backbone, n_items=table.shape[0] - 1, list_size=lists.items.shape[1], history_len=lists.history.shape[1],
        attr_columns=columns, attr_vocab=vocab, attr_values=table.shape[2], knowledge_dim=knowledge_dim, encoder=encoder,
        embed_dim=config.embed_dim, hidden_dim=config.hidden_dim, n_heads=config.n_heads, n_layers=config.n_layers,
        dropout=config.dropout, shared_experts=config.shared_experts, specific_experts=config.specific_experts, adapter_dim=config.adapter_dim,
    )
    torch.manual_seed(config.seed)  # the same seed gives the same initial weights
    model = build_model(spec)
    model.item_attrs.copy_(table)
    if spec.knowledge_dim is not None:
        if item_vectors is None:
            raise InputError("knowledge is on but no item vectors were given")
        model.item_knowledge.copy_(item_knowledge(spec.n_items + 1, *item_vectors))
    return model


@dataclass
class TrainResult:
    model: Reranker
    curve: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0


@contextlib.contextmanager
def deterministic_kernels():
    """Same inputs, same weights: with PyTorch's default CPU kernels two identical trainings differed by ~1e-6 in
    the weights, enough to flip which of two nearly tied texts wins a reward (and so the DPO pairs and the report)."""
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def train_recommender(model: Reranker, lists: ListTensors, knowledge: UserKnowledge | None, config: RecommendConfig, progress: bool = True) -> TrainResult:
    """Fit on train lists, select the epoch on validation MAP@5, return the best model."""
    with deterministic_kernels():
        return _train(model, lists, knowledge, config, progress)


def _train(model: Reranker, lists: ListTensors, knowledge: UserKnowledge | None, config: RecommendConfig, progress: bool) -> TrainResult:
    device = resolve_device(config.device, "recommend.device")
    model.to(device)
    train, valid = lists.of_split("train"), lists.of_split("validation")
    if len(train) == 0 or len(valid) == 0:
        raise InputError(f"recommend: need train and validation lists, got {len(train)} and {len(valid)}")
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    return fit_epochs(model, config, lambda epoch: _train_epoch(model, optimizer, train, knowledge, config, generator, device, progress, epoch),
                      lambda: mean_metrics(evaluate(model, valid, knowledge, config)), (SELECT_METRIC, "ndcg@5"))


def fit_epochs(model, config: RecommendConfig, run_epoch, validate, shown: tuple[str, ...]) -> TrainResult:
    """The epoch loop every recommender shares: ``run_epoch(epoch)`` trains one epoch and returns its mean loss,
    ``validate()`` returns validation metrics; the epoch with the best ``shown[0]`` is kept, and training stops
    after ``config.patience`` epochs without a better one."""
    result, best, stale = TrainResult(model), -1.0, 0
    best_state = copy.deepcopy(model.state_dict())
    start = time.perf_counter()
    for epoch in range(1, config.max_epochs + 1):
        tick = time.perf_counter()
        loss = run_epoch(epoch)
        train_seconds = time.perf_counter() - tick
        val = validate()
        row = {"epoch": epoch, "train_loss": loss, **{f"validation_{k}": v for k, v in val.items()},
               "train_seconds": train_seconds, "seconds": time.perf_counter() - tick}
        result.curve.append(row)
        log.info("epoch %d: loss %.4f, validation %s (%.1fs)", epoch, loss, ", ".join(f"{m} {val[m]:.4f}" for m in shown), row["seconds"])
        if val[shown[0]] > best:
            best, stale, result.best_epoch = val[shown[0]], 0, epoch
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= config.patience:
                break
    model.load_state_dict(best_state)
    result.seconds = time.perf_counter() - start
    return result


def _train_epoch(model, optimizer, train: ListTensors, knowledge, config, generator, device, progress, epoch) -> float:
    model.train()
    order = torch.randperm(len(train), generator=generator)
    total, steps = 0.0, 0
    for start in tqdm(range(0, len(order), config.batch_size), desc=f"epoch {epoch}", unit="batch", disable=not progress, leave=False):
        rows = order[start : start + config.batch_size]
        vectors, known = _knowledge_rows(knowledge, train.user_index[rows])
        if known is not None and config.unknown_rate > 0:
            known = known & (torch.rand(len(rows), generator=generator) >= config.unknown_rate)
        with _autocast(config, device):
            scores = model(train.items[rows].to(device), train.history[rows].to(device), _to(vectors, device), _to(known, device))
            loss = model.loss(scores.float(), train.labels[rows].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, steps = total + loss.item(), steps + 1
    return total / max(steps, 1)


@torch.inference_mode()
def predict(model: Reranker, lists: ListTensors, knowledge: UserKnowledge | None, config: RecommendConfig | None = None, batch_size: int = 4096) -> np.ndarray:
    """Scores (N, L) for ``lists`` in eval mode."""
    config = config or RecommendConfig(device="cpu")
    device = next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(lists), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(lists)))
        vectors, known = _knowledge_rows(knowledge, lists.user_index[rows])
        with _autocast(config, device):
            scores = model(lists.items[rows].to(device), lists.history[rows].to(device), _to(vectors, device), _to(known, device))
        out.append(scores.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(tuple(lists.items.shape), np.float32)


def evaluate(model: Reranker, lists: ListTensors, knowledge: UserKnowledge | None, config: RecommendConfig | None = None) -> dict[str, np.ndarray]:
    """Per-list KAR metrics of the model's ranking."""
    return rerank_metrics(lists.labels.numpy(), predict(model, lists, knowledge, config))


def _knowledge_rows(knowledge: UserKnowledge | None, users: torch.Tensor):
    if knowledge is None:
        return None, None
    return knowledge.vectors[users], knowledge.known[users]


def _to(tensor, device):
    return None if tensor is None else tensor.to(device)


def _autocast(config: RecommendConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")


def missing_knowledge(lists: ListTensors, knowledge: UserKnowledge) -> dict[str, int]:
    """Users per split that have lists but no knowledge vector."""
    counts = {}
    for split in ("train", "validation", "test"):
        users = torch.unique(lists.of_split(split).user_index)
        counts[split] = int((~knowledge.known[users]).sum())
    return counts
