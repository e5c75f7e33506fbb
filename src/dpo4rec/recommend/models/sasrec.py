"""SASRec: Kang and McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018, arXiv 1808.09781,
with KAR's knowledge (Xi et al. 2023, arXiv 2306.10933) as an option.

A user's item sequence goes through causal self-attention blocks; the output
at position t is a query vector whose dot product with every item's vector
scores the item to come after t. Item vectors are shared between input and
output, as in the paper. As the paper's code: pre-norm blocks, one feed-forward
of the embedding's width, a learned position embedding, embeddings scaled by
sqrt(d), a final layer norm.

Where this differs from the paper, and why:
* Positions count from the end of the sequence (the last item is position 0).
  The paper left-pads every sequence to ``max_len`` and numbers the padded
  window, which gives the same numbers to real items; counting from the end
  lets a batch be padded only to its longest sequence (right padding, so that
  under the causal mask a real position never sees a pad and needs no key mask).
* Trained with cross-entropy over all items (``recommend/sequential.py``),
  not the paper's one sampled negative per position: with it SASRec matches
  or beats BERT4Rec (Klenitskiy and Vasilev, RecSys 2023).

Knowledge (``spec.knowledge_dim`` set): every item's text vector goes through
the adapter's item tower and is added to the item's id embedding, in the input
and in the output scoring alike, so a rarely seen item borrows what its text
says; the user's text vector goes through the user tower and is added to the
query vector (KAR joins it to the model's representation; the tower ends in a
linear layer, so adding it is concatenation followed by a projection that
keeps the sequence's part fixed). The towers output ``embed_dim`` (they must
match the item embedding), not ``adapter_dim``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dpo4rec.errors import InputError
from dpo4rec.recommend.adapter import HybridExpertAdapter
from dpo4rec.recommend.models.base import ModelSpec, register


@register("sasrec")
class SASRec(nn.Module):
    """Next-item scores over the whole catalog; ``kind`` tells the trainers apart from the re-rankers."""

    kind = "sequential"

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        d = spec.embed_dim
        if d % spec.n_heads:
            raise InputError(f"recommend.embed_dim ({d}) must be a multiple of recommend.n_heads ({spec.n_heads}) for sasrec")
        self.item_embedding = nn.Embedding(spec.n_items + 1, d, padding_idx=0)
        self.position = nn.Embedding(spec.history_len, d)
        self.dropout = nn.Dropout(spec.dropout)
        layer = nn.TransformerEncoderLayer(d, spec.n_heads, dim_feedforward=d, dropout=spec.dropout, activation="relu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, spec.n_layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(d)
        self.knowledge = spec.knowledge_dim is not None
        if self.knowledge:
            k = spec.knowledge_dim
            self.register_buffer("item_knowledge", torch.zeros(spec.n_items + 1, k))
            self.unknown_knowledge = nn.Parameter(torch.zeros(k))  # users without a text (see train.py)
            self.adapter = HybridExpertAdapter(k, d, 2, spec.shared_experts, spec.specific_experts, spec.hidden_dim, spec.dropout)
        nn.init.normal_(self.item_embedding.weight, std=d ** -0.5)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    def item_table(self) -> torch.Tensor:
        """(n_items + 1, d): every item's vector, the item tower's output added when knowledge is on."""
        table = self.item_embedding.weight
        if self.knowledge:
            tower = self.adapter(self.item_knowledge[1:], tower=1)  # row 0 pads and stays zero
            table = table + torch.cat([tower.new_zeros(1, tower.shape[1]), tower])
        return table

    def encode(self, items: torch.Tensor, lengths: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) right-padded item sequences with their lengths -> (B, T, d) query vectors, one per position.

        Position t sees items 0..t only (causal mask); outputs at padded positions are meaningless.
        """
        if items.shape[1] > self.spec.history_len:
            raise InputError(f"sequences of {items.shape[1]} items are longer than the model's max_len {self.spec.history_len}")
        table = self.item_table() if table is None else table
        steps = torch.arange(items.shape[1], device=items.device)
        from_end = (lengths.unsqueeze(1) - 1 - steps).clamp(min=0)  # (B, T): the last real item is 0
        x = table[items] * math.sqrt(self.spec.embed_dim) + self.position(from_end)
        x = self.dropout(x * (items > 0).unsqueeze(-1))
        causal = nn.Transformer.generate_square_subsequent_mask(items.shape[1], device=items.device, dtype=x.dtype)
        return self.final_norm(self.blocks(x, mask=causal, is_causal=True))

    def join_user(self, queries: torch.Tensor, user_knowledge: torch.Tensor | None, known: torch.Tensor | None) -> torch.Tensor:
        """Add the user tower's output to each query: ``queries`` (B, ..., d), ``user_knowledge`` (B, k)."""
        if not self.knowledge:
            return queries
        if user_knowledge is None:
            raise InputError("this model was trained with knowledge: pass one knowledge vector per sequence")
        if user_knowledge.shape[-1] != self.spec.knowledge_dim:
            raise InputError(f"knowledge vectors have dimension {user_knowledge.shape[-1]}, the model expects {self.spec.knowledge_dim} (encoder {self.spec.encoder})")
        if known is not None:
            user_knowledge = torch.where(known.unsqueeze(-1), user_knowledge, self.unknown_knowledge.expand_as(user_knowledge))
        user = self.adapter(user_knowledge, tower=0)  # (B, d)
        return queries + user.view(user.shape[0], *([1] * (queries.dim() - 2)), user.shape[1])

    def forward(self, items: torch.Tensor, lengths: torch.Tensor, user_knowledge: torch.Tensor | None = None,
                known: torch.Tensor | None = None) -> torch.Tensor:
        """Scores (B, n_items + 1) of every item as the next after each sequence's last item (column 0 = padding)."""
        table = self.item_table()
        queries = self.encode(items, lengths, table)
        last = queries[torch.arange(items.shape[0], device=items.device), lengths - 1]  # (B, d)
        return self.join_user(last, user_knowledge, known) @ table.T
