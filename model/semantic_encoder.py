"""Semantic encoder: maps class word embeddings to prototypes in the visual feature space."""
from __future__ import annotations

import torch
import torch.nn as nn


class SemanticEncoder(nn.Module):
    """A linear layer (``hidden_size: 0``; official keys ``model.weight/bias``) or an MLP
    (Linear, LeakyReLU 0.2, Dropout, Linear). Xavier-uniform weights, biases 0.01 (official).
    Works on any tensor whose last axis is ``embed_dim``."""

    def __init__(self, embed_dim: int = 300, feature_dim: int = 256, hidden_size: int = 0, dropout: float = 0.5):
        super().__init__()
        if hidden_size == 0:
            self.model = nn.Linear(embed_dim, feature_dim)
        else:
            self.model = nn.Sequential(nn.Linear(embed_dim, hidden_size), nn.LeakyReLU(0.2, inplace=True),
                                       nn.Dropout(dropout), nn.Linear(hidden_size, feature_dim))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.constant_(m.bias, 0.01)

    @property
    def is_linear(self) -> bool:
        """True when the encoder is one affine map (allows the fast BAR target)."""
        return isinstance(self.model, nn.Linear)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.model(embeddings)
