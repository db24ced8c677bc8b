"""Group-aware neighbourhoods for DeFT's scoring: which tokens each token is judged together with.

DeFT scores a token together with its group, chosen by modality:

- image (layout ``(1, H, W)``): the 8-connected spatial neighbours on the patch grid;
- video (layout ``(T, H, W)``): the 8 spatial neighbours in the same frame plus the token at the same
  ``(h, w)`` in frames ``t-2 .. t+2`` (±``video_radius`` frames); audio rows (layout ``(T, 1, 1)``)
  use the same rule, so their neighbours are the ±2 surrounding time steps;
- text: the ``text_k`` (default 5) most similar tokens of the row by cosine similarity of their
  semantic features (all the other tokens when the row has fewer than ``text_k + 1``).

Neighbours are found by ORIGINAL position (``batch.index`` decoded on the row's ``layout``), so they
stay right after an earlier reducer; a neighbour an earlier reducer removed, or one outside the grid,
is simply absent. Everything is batched: no loop over rows or tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .batch import Modality

SPATIAL_OFFSETS = [(dh, dw) for dh in (-1, 0, 1) for dw in (-1, 0, 1) if (dh, dw) != (0, 0)]
"""The 8-connected neighbourhood on a patch grid, as (dh, dw)."""


def neighbour_offsets(video_radius: int, device) -> Tensor:
    """(8 + 2 * video_radius, 3) long ``(dt, dh, dw)``: :data:`SPATIAL_OFFSETS` in order, then ``dt`` in
    ``-r..-1, 1..r``. Built by kernels on ``device`` (a ``torch.tensor`` of a Python list would be a
    synchronous host-to-device copy)."""
    step = torch.arange(-1, 2, device=device)  # (3,)
    grid = torch.stack([torch.zeros(9, dtype=torch.long, device=device), step.repeat_interleave(3), step.repeat(3)], 1)
    spatial = torch.cat([grid[:4], grid[5:]])  # (8, 3): the centre (0, 0, 0) left out
    dt = torch.arange(-video_radius, video_radius + 1, device=device)
    dt = torch.cat([dt[:video_radius], dt[video_radius + 1:]])  # (2r,)
    temporal = torch.stack([dt, torch.zeros_like(dt), torch.zeros_like(dt)], 1)
    return torch.cat([spatial, temporal])


def grid_neighbours(index: Tensor, mask: Tensor, layout: Tensor, video_radius: int = 2) -> tuple[Tensor, Tensor]:
    """Spatial (8-connected) and temporal (±``video_radius`` frames, same h, w) neighbours.

    index, mask (B, N); layout (B, 3) ``(T, H, W)``. Returns ``(pos, valid)``, each (B, N, K) with
    ``K = 8 + 2 * video_radius``: ``pos`` is the neighbour's position along N in the current batch
    (0 where invalid), ``valid`` says the neighbour exists (inside the grid, present, real).
    Temporal slots are valid only when ``T > 1`` (an image has none).
    """
    b, n = mask.shape
    dev = index.device
    t_len, h_len, w_len = layout.clamp(min=1).unbind(1)  # (B,)
    hw = (h_len * w_len)[:, None]  # (B, 1)
    t, rem = index // hw, index % hw  # (B, N)
    h, w = rem // w_len[:, None], rem % w_len[:, None]

    off = neighbour_offsets(video_radius, dev)  # (K, 3)
    nt = t[..., None] + off[:, 0]  # (B, N, K)
    nh = h[..., None] + off[:, 1]
    nw = w[..., None] + off[:, 2]
    inside = (
        (nt >= 0) & (nt < t_len[:, None, None]) & (nh >= 0) & (nh < h_len[:, None, None])
        & (nw >= 0) & (nw < w_len[:, None, None])
    )
    orig = nt * hw[..., None] + nh * w_len[:, None, None] + nw  # (B, N, K) original index of the neighbour

    # original index -> current position (-1 when absent: pruned earlier, or padding), by binary search in
    # each row's real indices sorted ascending (padding sorts last): static shapes, no host read
    if n == 0:
        return orig.clamp(min=0), inside & False
    big = torch.iinfo(torch.long).max
    sorted_key, order = torch.where(mask, index, big).sort(dim=1, stable=True)  # (B, N)
    query = torch.where(inside, orig, -1).flatten(1)  # (B, N*K); -1 is never a real index
    at = torch.searchsorted(sorted_key, query).clamp(max=n - 1)  # (B, N*K)
    found = sorted_key.gather(1, at) == query
    pos = torch.where(found, order.gather(1, at), -1).view(b, n, -1)  # (B, N, K)
    valid = inside & (pos >= 0) & mask[..., None]
    return pos.clamp(min=0), valid


def text_neighbours(features: Tensor, mask: Tensor, k: int = 5) -> tuple[Tensor, Tensor]:
    """The ``k`` most cosine-similar other real tokens of each token's row. (B, N, k') each, k' = min(k, N-1)."""
    b, n, _ = features.shape
    kk = max(0, min(k, n - 1))
    if kk == 0:
        empty = torch.zeros(b, n, 0, dtype=torch.long, device=features.device)
        return empty, empty.bool()
    f = torch.nn.functional.normalize(features.float(), dim=-1)
    sim = f @ f.transpose(1, 2)  # (B, N, N)
    eye = torch.eye(n, dtype=torch.bool, device=features.device)
    allowed = mask[:, None, :] & mask[:, :, None] & ~eye
    sim = sim.masked_fill(~allowed, float("-inf"))
    val, pos = sim.topk(kk, dim=-1)  # ties: lowest position first (topk on CPU/GPU is stable enough; see test)
    return pos, torch.isfinite(val)


def group_neighbours(
    index: Tensor,
    mask: Tensor,
    modality: Tensor,
    layout: Tensor,
    features: Tensor | None,
    text_k: int = 5,
    video_radius: int = 2,
    kinds: frozenset[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Each token's group by its row's modality (see the module doc). ``(pos, valid)``, (B, N, K).

    Image, video and audio rows use :func:`grid_neighbours`; text rows :func:`text_neighbours` on
    ``features`` (the token values when a row has no semantic features). The text neighbours are computed
    for every row whenever ``features`` is given, ``text_k`` > 0 and ``kinds`` (the modality codes the
    batch may hold, known on the host: ``TokenBatch.kinds``; None: unknown) allows a text row, and kept
    only for text rows: nothing is read from the device to decide. Rows of different
    modalities share one batch: both neighbour sets are computed and each row keeps its own.
    """
    pos, valid = grid_neighbours(index, mask, layout, video_radius)
    is_text = modality == int(Modality.TEXT)  # (B,)
    valid = valid & ~is_text[:, None, None]
    may_be_text = kinds is None or int(Modality.TEXT) in kinds  # known on the host (TokenBatch.kinds): no device read
    if features is not None and text_k > 0 and may_be_text:  # for every row, kept for text rows
        tpos, tvalid = text_neighbours(features, mask, text_k)
        tvalid = tvalid & is_text[:, None, None]
        pos, valid = torch.cat([pos, tpos], -1), torch.cat([valid, tvalid], -1)
    return pos, valid


def group_mean(scores: Tensor, pos: Tensor, valid: Tensor) -> Tensor:
    """Mean score of each token's valid neighbours, (B, N); a token without neighbours keeps its own."""
    b, n, k = pos.shape
    if k == 0:
        return scores
    nb = scores.gather(1, pos.flatten(1)).view(b, n, k)
    w = valid.to(scores.dtype)
    count = w.sum(-1)
    mean = (nb * w).sum(-1) / count.clamp(min=1)
    return torch.where(count > 0, mean, scores)
