"""KAR's hybrid-expert adapter (HEA), Xi et al. 2023, arXiv 2306.10933, Sec. 3.3.

It maps frozen text-encoder vectors (semantic space) into the recommender's
space. Each input kind is a *tower* (tower 0 = user knowledge, tower 1 = item
knowledge). A tower mixes the outputs of experts shared by all towers and of
experts of its own, with softmax gate weights computed from its input:

    out_t(x) = sum_j softmax(G_t x)_j * expert_j(x),  experts = shared + specific_t

A tower's output depends only on its own input, so the item tower can run
once per item and the user tower once per knowledge sample (the reward
scorer relies on that). The outputs are concatenated with the ID embeddings
by the re-ranker.
"""

from __future__ import annotations

import torch
from torch import nn


def _expert(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


class HybridExpertAdapter(nn.Module):
    """Shared + tower-specific MLP experts with a softmax gate per tower."""

    def __init__(self, in_dim: int, out_dim: int, n_towers: int = 2, shared: int = 2, specific: int = 2, hidden: int = 128, dropout: float = 0.0):
        super().__init__()
        self.shared = nn.ModuleList(_expert(in_dim, hidden, out_dim, dropout) for _ in range(shared))
        self.specific = nn.ModuleList(
            nn.ModuleList(_expert(in_dim, hidden, out_dim, dropout) for _ in range(specific)) for _ in range(n_towers)
        )
        self.gates = nn.ModuleList(nn.Linear(in_dim, shared + specific) for _ in range(n_towers))
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor, tower: int) -> torch.Tensor:
        """``x`` (..., in_dim) -> (..., out_dim) through tower ``tower``."""
        experts = [e(x) for e in self.shared] + [e(x) for e in self.specific[tower]]
        stacked = torch.stack(experts, dim=-2)  # (..., n_experts, out_dim)
        gate = torch.softmax(self.gates[tower](x), dim=-1).unsqueeze(-1)  # (..., n_experts, 1)
        return (gate * stacked).sum(dim=-2)  # (..., out_dim)
