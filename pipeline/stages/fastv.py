"""FastV-style pruning inside the LLM (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", 2024).

After decoder layer ``layer - 1`` (0-based; FastV's ``K = layer``) the media tokens that the last
``num_queries`` prompt positions pay the least attention to (averaged over heads and those queries) are
dropped, ``drop_ratio`` of each row's media tokens (FastV's ``R``); text is always kept. Layers from
``layer`` on compute and cache only what is left. ``drop_ratio: 0`` keeps everything (identity).

``scoring: random`` drops the same number of media tokens uniformly at random instead (drawn from a
generator seeded by ``seed`` at every call, so the same batch always loses the same tokens): the
baseline that tells whether the attention scores matter on a task.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field

from ..llm import AttentionProbe, LayerStage, LayerState, kept_columns
from ..registry import register
from ..types import NonNegInt, PosInt

DropRatio = Annotated[float, Field(ge=0, le=1)]


@register("fastv")
class FastV(LayerStage):
    def __init__(self, dim: int | None = None, layer: PosInt = 2, drop_ratio: DropRatio = 0.5, num_queries: PosInt = 1,
                 scoring: Literal["attention", "random"] = "attention", seed: NonNegInt = 0):
        super().__init__(layer)
        self.drop_ratio = drop_ratio
        self.queries = num_queries
        self.scoring = scoring
        self.seed = seed

    def reduce(self, state: LayerState, attention: AttentionProbe) -> LayerState:
        media = state.media  # (B, L)
        if self.drop_ratio == 0:
            return state
        if self.scoring == "random":
            gen = torch.Generator(device=media.device).manual_seed(self.seed)  # on the device: no host copy
            score = torch.rand(media.shape, generator=gen, device=media.device)
        else:
            score = attention(self.queries).mean(dim=(1, 2))  # (B, L): heads and asking positions averaged
        n_media = media.sum(1)  # (B,)
        n_keep = torch.ceil(n_media.double() * (1 - self.drop_ratio) - 1e-9).long()  # (B,)
        ranked = torch.where(media, score, torch.full_like(score, -math.inf))
        order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        keep = (state.mask & ~media) | (media & (rank < n_keep.unsqueeze(1)))
        # 0-dim tensors: read (and synchronised) only by whoever asks for them
        self.last_stats = {"media_in": n_media.float().mean(), "media_kept": n_keep.float().mean()}
        out = state.take(keep)
        if self.record_assignment:  # tracing only (pipeline.llm.LayerStage): where each input column went
            keep = keep & state.mask
            same = torch.where(keep, torch.arange(keep.shape[1], device=keep.device), -1)  # nothing moved
            self.last_assignment = same if out is state else kept_columns(keep, out.hidden.shape[1])
        return out

    def extra_repr(self) -> str:
        return f"layer={self.layer}, drop_ratio={self.drop_ratio}, num_queries={self.queries}, scoring={self.scoring!r}"
