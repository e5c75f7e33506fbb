"""PRM: Pei, Zhang, Zhang, et al. "Personalized Re-ranking for Recommendation",
RecSys 2019, arXiv 1904.06813.

Each candidate's features are concatenated with a personalized vector (PV),
projected, given a learned position embedding of its place in the initial
list, and encoded by a stack of transformer blocks, so that every score sees
every other candidate; a linear layer scores each output. The paper's PV comes
from a pre-trained CTR model; ours is the mean of the user's recent-history
features (computed by the base class), learned jointly.
"""

from __future__ import annotations

import torch
from torch import nn

from dpo4rec.recommend.models.base import ModelSpec, Reranker, register


@register("prm")
class PRM(Reranker):
    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        h = spec.hidden_dim
        self.input = nn.Linear(self.item_dim + self.personal_dim, h)
        self.position = nn.Parameter(torch.zeros(spec.list_size, h))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(h, spec.n_heads, dim_feedforward=2 * h, dropout=spec.dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, spec.n_layers, enable_nested_tensor=False)
        self.score = nn.Linear(h, 1)

    def rank(self, x: torch.Tensor, personal: torch.Tensor) -> torch.Tensor:
        pv = personal.unsqueeze(1).expand(-1, x.shape[1], -1)  # (B, L, personal_dim)
        z = self.input(torch.cat([x, pv], dim=-1)) + self.position[: x.shape[1]]  # (B, L, h)
        return self.score(self.encoder(z)).squeeze(-1)  # (B, L)
