"""SetRank: Pang, Xu, Ai, Lan, Cheng, Wen. "SetRank: Learning a Permutation-Invariant
Ranking Model for Information Retrieval", SIGIR 2020, arXiv 1912.05891.

The candidates form a set: stacked multi-head self-attention blocks (MSAB:
attention + row-wise feed-forward, residuals, layer norm) with no position
information, so a candidate's score does not depend on the order of the list
(permutation equivariance, tested). The user's personal vector is appended to
every candidate, which keeps that property. Trained with the paper's
attention rank loss: cross-entropy between the softmax of the scores and the
labels' attention distribution.
"""

from __future__ import annotations

import torch
from torch import nn

from dpo4rec.recommend.models.base import ModelSpec, Reranker, register


@register("setrank")
class SetRank(Reranker):
    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        h = spec.hidden_dim
        self.input = nn.Linear(self.item_dim + self.personal_dim, h)
        block = nn.TransformerEncoderLayer(h, spec.n_heads, dim_feedforward=2 * h, dropout=spec.dropout, batch_first=True)
        self.blocks = nn.TransformerEncoder(block, spec.n_layers, enable_nested_tensor=False)
        self.score = nn.Linear(h, 1)

    def rank(self, x: torch.Tensor, personal: torch.Tensor) -> torch.Tensor:
        pv = personal.unsqueeze(1).expand(-1, x.shape[1], -1)  # (B, L, personal_dim)
        return self.score(self.blocks(self.input(torch.cat([x, pv], dim=-1)))).squeeze(-1)  # (B, L)

    def list_log_likelihood(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per list: minus the attention rank loss (lists without a positive get 0)."""
        gains = torch.where(labels > 0, torch.exp(labels), torch.zeros_like(labels))
        target = gains / gains.sum(1, keepdim=True).clamp_min(1e-12)
        return (target * torch.log_softmax(scores, dim=1)).sum(1)

    def loss(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Attention rank loss; lists without a positive carry no signal and are skipped."""
        has_positive = labels.sum(1) > 0  # (B,)
        if not has_positive.any():
            return scores.sum() * 0.0
        gains = torch.where(labels > 0, torch.exp(labels), torch.zeros_like(labels))[has_positive]  # (B', L)
        target = gains / gains.sum(1, keepdim=True)
        return -(target * torch.log_softmax(scores[has_positive], dim=1)).sum(1).mean()
