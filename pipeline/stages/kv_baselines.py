"""KV-cache baselines beside TOVA, in one budget accounting (``cache_max_size`` slots per row, layer and
KV head):

- ``streaming_llm`` (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", 2023):
  the first ``num_sinks`` tokens plus the most recent ones; no attention needed.
- ``h2o`` (Zhang et al., "H2O: Heavy-Hitter Oracle", 2023): the tokens with the largest attention
  accumulated over every query so far (prompt and generated), plus the ``recent_ratio`` most recent.
- ``snapkv`` (Li et al., "SnapKV", 2024): at prefill only, the attention of the last ``window_size``
  prompt positions, summed and pooled over ``kernel_size`` neighbours; the window itself is always
  kept; the cache then grows while decoding.

Scores are per KV head: the query heads sharing a KV head are summed (GQA).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..llm import CachePolicy, CacheView, group_heads
from ..registry import register
from ..types import NonNegInt, PosInt

Layers = list[NonNegInt] | None
OpenRatio = Annotated[float, Field(ge=0, le=1)]

_KEEP = 1e30  # score of slots a policy always keeps (finite: invalid slots are -inf)


def _recent(view: CacheView, n: int) -> Tensor:
    """(B, H_kv, T) bool: the ``n`` most recent valid slots of each (row, KV head), by cached position."""
    if n <= 0:
        return torch.zeros_like(view.valid)
    pos = torch.where(view.valid, view.positions, torch.full_like(view.positions, -1))
    k = min(n, pos.shape[-1])
    cut = pos.topk(k, dim=-1).values[..., -1:]  # (B, H_kv, 1) the n-th largest position
    return view.valid & (pos >= cut)


@register("streaming_llm")
class StreamingLLM(CachePolicy):
    def __init__(self, dim: int | None = None, cache_max_size: PosInt = 512, layers: Layers = None, num_sinks: NonNegInt = 4):
        super().__init__(cache_max_size, layers)
        self.num_sinks = num_sinks

    window = 0  # needs no attention
    graph_safe = True

    def score(self, view: CacheView) -> Tensor:
        big = torch.iinfo(torch.long).max // 4
        pos = torch.where(view.valid, view.positions, torch.full_like(view.positions, big))
        first = pos.min(dim=-1, keepdim=True).values  # (B, H_kv, 1) the row's first cached position
        sink = view.valid & (view.positions < first + self.num_sinks)
        return torch.where(sink, torch.full_like(view.positions, big), view.positions).double()


@register("h2o")
class H2O(CachePolicy):
    def __init__(self, dim: int | None = None, cache_max_size: PosInt = 512, layers: Layers = None,
                 recent_ratio: OpenRatio = 0.5):
        super().__init__(cache_max_size, layers)
        self.recent_ratio = recent_ratio

    window = "all"  # the accumulated attention of every prompt position

    graph_safe = True  # accumulates in place, so a captured decoding step chains

    def update(self, view: CacheView) -> None:
        got = group_heads(view.attn, view.num_kv_heads).sum(dim=(2, 3))  # (B, H_kv, T)
        acc = view.extras.get("h2o_acc")
        if acc is None:
            view.extras["h2o_acc"] = got
        else:  # the runtime keeps extras aligned with the slots (new slots start at 0)
            acc.add_(got)

    def score(self, view: CacheView) -> Tensor:
        recent = _recent(view, int(math.floor(self.cache_max_size * self.recent_ratio)))
        return torch.where(recent, torch.full_like(view.extras["h2o_acc"], _KEEP), view.extras["h2o_acc"])


@register("snapkv")
class SnapKV(CachePolicy):
    def __init__(self, dim: int | None = None, cache_max_size: PosInt = 512, layers: Layers = None,
                 window_size: PosInt = 32, kernel_size: PosInt = 5):
        super().__init__(cache_max_size, layers)
        self.window = window_size
        self.kernel_size = kernel_size

    evict_in_decoding = False

    def score(self, view: CacheView) -> Tensor:
        votes = group_heads(view.attn, view.num_kv_heads).sum(dim=(2, 3))  # (B, H_kv, T)
        b, h, t = votes.shape
        k = self.kernel_size | 1  # odd, so the pooled score stays centred
        # the mean over each slot's VALID neighbours: a left-padded row pools as it would alone
        valid = view.valid.to(votes.dtype)

        def pool(x: Tensor) -> Tensor:
            return F.avg_pool1d(x.reshape(b * h, 1, t), kernel_size=k, stride=1, padding=k // 2,
                                count_include_pad=False).reshape(b, h, t)

        pooled = pool(votes * valid) / pool(valid).clamp_min(1e-12)
        # the observation window: kept as is (its most recent tokens, when it is larger than the budget:
        # tied scores would keep its OLDEST ones and drop the prompt's last token)
        window = _recent(view, min(self.window, self.budget(view)))
        return torch.where(window, torch.full_like(pooled, _KEEP), pooled)
