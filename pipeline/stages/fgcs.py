"""``fgcs``: DeFT's Feedback-Guided Compression and Selection, semantic-saliency scoring.

Reference: Liu & Yu, "DeFT: Decoupled and Feedback-Guided Tokenization for Efficient Multimodal
Long-Context Modeling", ICML 2025 (New In ML), https://dev.icml.cc/virtual/2025/50483 .

This stage implements the learned saliency term of the paper's hybrid score; the gradient
feedback term and group-aware (per-modality neighbourhood) scoring are separate additions.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..batch import TokenBatch
from ..config import StageConfig
from ..ops import select_topk
from ..registry import register


@register("fgcs")
class FGCS(nn.Module):
    """Score tokens with a 3-layer saliency MLP, keep the top ``ceil(retention_ratio * n)`` per row.

    Input: ``batch.features (B, N, S)`` when the pipeline has a feature stage (``sam``) before
    this one (the builder passes ``feature_dim=S``), otherwise ``batch.tokens (B, N, D)``.
    Output: the kept tokens in original order, ``scores (B, K)``, the rest in ``pruned``.

    Selection is a hard, deterministic top-k (ties: earlier token wins) in train and eval. In
    training the kept tokens pass through a straight-through gate so the task loss reaches the
    saliency MLP: ``x * (1 + s - s.detach())`` with ``s = sigmoid(score)``, computed as
    ``x + x * (s - s.detach())`` so the forward value is bit-identical to ``x``.
    """

    selects_tokens = True  # kept tokens are input rows (the gate leaves their values unchanged)

    class Config(StageConfig):
        name: Literal["fgcs"] = "fgcs"
        retention_ratio: float = Field(0.482, gt=0, le=1)
        hidden_dim: int = Field(256, gt=0)

    def __init__(self, dim: int, retention_ratio: float = 0.482, hidden_dim: int = 256, feature_dim: int | None = None):
        super().__init__()
        self.retention_ratio = retention_ratio
        self.use_features = feature_dim is not None
        in_dim = feature_dim if feature_dim is not None else dim
        self.saliency = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, 1),
        )

    def score(self, batch: TokenBatch) -> torch.Tensor:
        """Saliency logits (B, N); higher = keep."""
        if self.use_features:
            if batch.features is None:
                raise ValueError(
                    "fgcs was built to score semantic features (feature_dim was given) but the batch "
                    "has no `features`; put a feature stage such as 'sam' before it"
                )
            x = batch.features  # (B, N, S)
        else:
            x = batch.tokens  # (B, N, D)
        return self.saliency(x).squeeze(-1)  # (B, N)

    def forward(self, batch: TokenBatch) -> TokenBatch:
        out = select_topk(batch, self.score(batch), self.retention_ratio, self.stage_name)
        if not self.training:
            return out
        s = torch.sigmoid(out.scores) * out.mask  # (B, K); padding slots get no gate
        gate = (s - s.detach()).unsqueeze(-1)  # (B, K, 1): 0 in value, d/ds = 1
        return out.replace(tokens=out.tokens + out.tokens * gate)
