"""Per decoder layer, what became of every prompt token: kept, merged, dropped, or evicted from the cache.

Input: the :class:`~llava_deft.model.llm.runtime.StageTrace` records of one recorded prefill
(``LLMStages(..., record=True)``) and, when it ran with cache policies, its
:class:`~llava_deft.model.llm.runtime.StagedCache`. One prompt row is followed through the stages:

- ``where`` (L,) is the column of the current layer state each prompt token sits in (-1: gone). It
  starts as the prompt's own columns; each layer stage maps it through its assignment (``StageTrace.columns``),
  so tokens merged by one stage stay together through the next.
- At layer ``i`` a token is **kept** when it has its column to itself, **merged** when it shares it with
  other prompt tokens (``group`` = the smallest token number of the group, the same for all of them),
  **dropped** when a layer stage before ``i`` removed it, and **evicted** when layer ``i`` computed it
  but no KV head of that layer's cache holds its slot after the prefill (a cache policy dropped it).
  ``heads`` is the share of the layer's KV heads whose cache still holds the token's slot (a slot is
  found by the RoPE position of its column: unique per row, and what ``TrackedLayer.positions`` keeps).

Host-side bookkeeping for one row of a viewer request, not part of a forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FATES", "LayerFates", "follow_tokens"]

FATES = ("kept", "merged", "dropped", "evicted")
"""What a prompt token can be in a layer (see the module docstring)."""


@dataclass
class LayerFates:
    """One decoder layer's view of the prompt (lists are per prompt token, in prompt order)."""

    layer: int
    fate: list[str]
    group: list[int | None]
    """For a merged token, its group's id (the smallest token number in it); else None."""
    by: list[str | None]
    """The stage that dropped, merged or evicted it (None for a kept token)."""
    heads: list[float | None]
    """Share of this layer's KV heads whose cache holds the token after the prefill (None: no cache)."""
    tokens: int
    """Columns this layer computes (kept tokens + merged groups)."""
    cache_tokens: float | None
    """Real slots of this layer's cache after the prefill, mean over KV heads (None: no cache)."""


def _held_positions(cache, layer: int, row: int) -> list[set[int]] | None:
    """Per KV head, the RoPE positions of the valid slots of ``layer``'s cache (None: no such cache)."""
    if cache is None or not hasattr(cache.layers[layer], "valid") or cache.layers[layer].valid is None:
        return None
    tl = cache.layers[layer]
    valid, positions = tl.valid[row].cpu(), tl.positions[row].cpu()  # (H_kv, T)
    return [set(positions[h][valid[h]].tolist()) for h in range(valid.shape[0])]


def follow_tokens(trace: Sequence, num_layers: int, mask: Tensor, positions: Tensor, cache=None,
                  policies: dict[int, str] | None = None, row: int = 0) -> list[LayerFates]:
    """The :class:`LayerFates` of every decoder layer for prompt row ``row``.

    ``trace``: the ``LLMStages.trace`` of the prefill; ``mask`` (B, L) bool and ``positions`` (B, L) long:
    the prompt's validity and RoPE positions as the LLM received them; ``cache``: that prefill's
    ``StagedCache`` (None: no cache was kept); ``policies``: layer -> name of the cache policy covering it
    (names the evictions). Tokens are the real columns of the row, in order, numbered from 0.
    """
    policies = policies or {}
    mask_row = mask[row].cpu().bool()
    cols = torch.nonzero(mask_row).flatten()  # (N,) prompt columns of the real tokens
    n = cols.numel()
    where = cols.clone()  # (N,) column in the current state
    state_pos = positions[row].cpu()  # RoPE position of every column of the current state
    by: list[str | None] = [None] * n
    after: dict[int, list] = {}
    for rec in trace:
        after.setdefault(rec.after_layer, []).append(rec)
    out = []
    for layer in range(num_layers):
        alive = where >= 0
        members: dict[int, list[int]] = {}
        for t in torch.nonzero(alive).flatten().tolist():
            members.setdefault(int(where[t]), []).append(t)
        held = _held_positions(cache, layer, row)
        fate, group, heads, who = [], [], [], []
        for t in range(n):
            if not alive[t]:
                fate.append("dropped"), group.append(None), heads.append(None), who.append(by[t])
                continue
            mates = members[int(where[t])]
            share = None
            if held is not None:
                pos = int(state_pos[where[t]])
                share = sum(pos in h for h in held) / len(held)
            if held is not None and share == 0:
                fate.append("evicted"), who.append(policies.get(layer))
            elif len(mates) > 1:
                fate.append("merged"), who.append(by[t])
            else:
                fate.append("kept"), who.append(None)
            group.append(min(mates) if len(mates) > 1 else None)
            heads.append(share)
        cache_tokens = None if held is None else sum(len(h) for h in held) / len(held)
        out.append(LayerFates(layer, fate, group, who, heads, len(members), cache_tokens))
        for rec in after.get(layer, ()):
            assign = rec.columns()[row].cpu()  # (L_in,) output column of each input column
            was = where.clone()
            where = torch.where(was >= 0, assign[was.clamp(min=0)], -1)
            grown = _group_sizes(where) > _group_sizes(was)
            name = rec.stage.stage_name
            for t in torch.nonzero(((was >= 0) & (where < 0)) | ((where >= 0) & grown)).flatten().tolist():
                by[t] = name
            state_pos = rec.positions[row].cpu()
    return out


def _group_sizes(where: Tensor) -> Tensor:
    """(N,) how many tokens share each token's column (0 for gone tokens)."""
    alive = where >= 0
    counts = torch.bincount(where[alive], minlength=int(where.max()) + 1 if alive.any() else 0)
    return torch.where(alive, counts[where.clamp(min=0)] if alive.any() else torch.zeros_like(where), 0)
