"""``sam``: DeFT's Semantic Abstraction Module, tokens of any modality into one semantic space.

Reference: Liu & Yu, "DeFT: Decoupled and Feedback-Guided Tokenization for Efficient Multimodal
Long-Context Modeling", ICML 2025 (New In ML), https://dev.icml.cc/virtual/2025/50483 .
"""

from __future__ import annotations

import torch
from torch import nn

from ..batch import TokenBatch
from ..registry import register
from ..types import PosInt


@register("sam")
class SemanticAbstraction(nn.Module):
    """2-layer MLP (Linear, GELU, Linear) from token width ``D`` to ``semantic_dim`` ``S``.

    Writes ``batch.features (B, N, S)`` (zero on padding); tokens, mask and index are unchanged.
    Later scorers (``fgcs``) read the features; the builder tells them ``S`` through
    ``feature_dim_out``.
    """

    selects_tokens = True  # output tokens are the input tokens, untouched

    def __init__(self, dim: int, semantic_dim: PosInt = 512):
        super().__init__()
        self.feature_dim_out = semantic_dim
        self.mlp = nn.Sequential(nn.Linear(dim, semantic_dim), nn.GELU(), nn.Linear(semantic_dim, semantic_dim))

    def forward(self, batch: TokenBatch) -> TokenBatch:
        features = self.mlp(batch.tokens)  # (B, N, S)
        features = torch.where(batch.mask.unsqueeze(-1), features, features.new_zeros(()))
        return batch.replace(features=features)
