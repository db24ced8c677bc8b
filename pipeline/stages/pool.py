"""``pool``: average pooling on each row's original token grid (the pooling baseline).

As in LLaVA-OneVision / LLaVA-Video's spatial pooling of visual tokens, but the kernel is
chosen per row from ``retention_ratio`` so the output never exceeds the shared token budget.
"""

from __future__ import annotations

from torch import nn

from ..batch import TokenBatch
from ..ops import pool_grid
from ..registry import register
from ..types import Ratio


@register("pool")
class GridPool(nn.Module):
    """Average-pool each row on its grid ``layout[b] = (T, H, W)`` to at most ``ceil(ratio * n)`` tokens.

    Each row gets the smallest square spatial kernel ``k`` with ``T*ceil(H/k)*ceil(W/k)``
    windows within its budget (frames are pooled too when ``T`` alone exceeds it). An output
    token is the masked mean of the real tokens in its window, at the window's smallest
    original index; ``features``/``scores`` are pooled alike. Inputs ``(B, N, D)`` -> ``(B, K, D)``,
    ``K`` = the most windows of any row; the non-representative tokens go to ``pruned``.
    No parameters; see :func:`pipeline.ops.pool_grid`.
    """

    selects_tokens = False  # output tokens are window means, not input rows

    def __init__(self, dim: int | None = None, retention_ratio: Ratio = 0.25):
        super().__init__()
        self.retention_ratio = retention_ratio

    def forward(self, batch: TokenBatch) -> TokenBatch:
        return pool_grid(batch, self.retention_ratio, self.stage_name)
