"""DLCM: Ai, Bi, Guo, Croft. "Learning a Deep Listwise Context Model for Ranking
Refinement", SIGIR 2018, arXiv 1804.05936.

A GRU reads the candidates of a list; its final state is the *local context*
of the list, and each candidate is scored against it with the paper's local
ranking function phi(o_n, s) = V . (o_n * tanh(W s + b)). We start the GRU
from the user's personal vector (the paper starts from zeros; the re-rank
task here is personalized), and feed the list in reverse order so that the
first candidates are read last, as the paper does with the initial ranking.
"""

from __future__ import annotations

import torch
from torch import nn

from dpo4rec.recommend.models.base import ModelSpec, Reranker, register


@register("dlcm")
class DLCM(Reranker):
    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        h = spec.hidden_dim
        self.input = nn.Sequential(nn.Linear(self.item_dim, h), nn.ELU())  # the paper's input abstraction layer
        self.init_state = nn.Linear(self.personal_dim, h)
        self.gru = nn.GRU(h, h, batch_first=True)
        self.context = nn.Linear(h, h)  # W, b of phi
        self.score = nn.Linear(h, 1)  # V of phi
        self.dropout = nn.Dropout(spec.dropout)

    def rank(self, x: torch.Tensor, personal: torch.Tensor) -> torch.Tensor:
        z = self.dropout(self.input(x)).flip(1)  # (B, L, h), last candidate first
        h0 = torch.tanh(self.init_state(personal)).unsqueeze(0)  # (1, B, h)
        outputs, final = self.gru(z, h0)  # (B, L, h), (1, B, h)
        local = torch.tanh(self.context(final.squeeze(0))).unsqueeze(1)  # (B, 1, h)
        return self.score(outputs * local).squeeze(-1).flip(1)  # (B, L), back in list order
