"""``random``: keep a uniformly random subset of each row (a strong baseline, per FastV/VisionZip tables)."""

from __future__ import annotations

import torch
from torch import nn

from ..batch import TokenBatch
from ..ops import select_topk
from ..registry import register
from ..types import Ratio


@register("random")
class RandomReducer(nn.Module):
    """Keep ``ceil(retention_ratio * n)`` random tokens per row, original order kept.

    In eval the choice is a fixed function of ``seed`` and the device type (the draws come from a
    generator on the tokens' device, so a GPU picks other tokens than the CPU for the same seed); in
    train it is fresh each call. ``dim`` is accepted for a uniform builder call and unused.
    """

    selects_tokens = True  # kept tokens are input rows

    def __init__(self, dim: int | None = None, retention_ratio: Ratio = 0.482, seed: int = 0):
        super().__init__()
        self.retention_ratio = retention_ratio
        self.seed = seed
        self._eval_key: tuple | None = None
        self._eval_scores: torch.Tensor | None = None

    def forward(self, batch: TokenBatch) -> TokenBatch:
        b, n = batch.mask.shape
        dev = batch.tokens.device
        if self.training:
            scores = torch.rand(b, n, device=dev)
        else:  # drawn once per shape from a generator on the tokens' device (no host-to-device copy), then
            # reused: the same picks as a fresh seeded draw, and no generator to seed inside a CUDA graph
            key = (b, n, str(dev), self.seed)
            if self._eval_key != key:
                gen = torch.Generator(device=dev).manual_seed(self.seed)
                self._eval_scores, self._eval_key = torch.rand(b, n, generator=gen, device=dev), key
            scores = self._eval_scores
        return select_topk(batch, scores, self.retention_ratio, self.stage_name)
