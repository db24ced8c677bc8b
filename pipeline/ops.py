"""Pure tensor functions shared by the stages: budgets, batched gather, top-k selection.

No Python loop over rows or tokens; every function works on ragged batches through ``mask``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .batch import PrunedTokens, TokenBatch, sort_key


def budget(lengths: Tensor, ratio: float) -> Tensor:
    """Tokens to keep per row: ``ceil(ratio * length)``, at least 1 for a non-empty row. (B,) long."""
    keep = torch.ceil(lengths.to(torch.float64) * ratio).long()
    return torch.minimum(torch.clamp(keep, min=1), lengths)


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """``x (B, N, ...)`` gathered along dim 1 by ``idx (B, K)`` -> ``(B, K, ...)``."""
    view = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:])
    return x.gather(1, view)


def keep_mask_topk(scores: Tensor, mask: Tensor, keep: Tensor) -> Tensor:
    """Bool (B, N): the ``keep[b]`` highest-scoring real tokens of each row.

    Ties are broken by position (earlier wins) so the result is deterministic.
    """
    n = scores.shape[1]
    neg = torch.finfo(scores.dtype).min
    s = torch.where(mask, scores, torch.full_like(scores, neg))
    # stable sort: equal scores keep their positional order
    order = torch.sort(s, dim=1, descending=True, stable=True).indices  # (B, N)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=s.device).expand_as(order))
    return (rank < keep.unsqueeze(1)) & mask


def split_by_mask(batch: TokenBatch, keep: Tensor, stage: str) -> TokenBatch:
    """Keep the tokens where ``keep (B, N)`` is True, in original order; move the rest to ``pruned``.

    The output length is the largest number kept in any row; shorter rows are padded and masked.
    Row-aligned tensors (``scores``, ``features``) follow the kept tokens.
    """
    keep = keep & batch.mask
    drop = batch.mask & ~keep
    n_keep = int(keep.sum(1).max().item()) if keep.numel() else 0
    n_drop = int(drop.sum(1).max().item()) if drop.numel() else 0

    def take(sel: Tensor, k: int) -> tuple[Tensor, Tensor]:
        order = sort_key(batch.index, sel).argsort(dim=1, stable=True)[:, :k]  # (B, k)
        return order, sel.gather(1, order)

    k_idx, k_mask = take(keep, n_keep)
    d_idx, d_mask = take(drop, n_drop)

    dropped = PrunedTokens(
        tokens=gather_rows(batch.tokens, d_idx),
        mask=d_mask,
        index=batch.index.gather(1, d_idx),
    )
    pruned = dropped if batch.pruned is None else batch.pruned.cat(dropped)
    out = batch.replace(
        tokens=gather_rows(batch.tokens, k_idx),
        mask=k_mask,
        index=batch.index.gather(1, k_idx),
        scores=None if batch.scores is None else batch.scores.gather(1, k_idx),
        features=None if batch.features is None else gather_rows(batch.features, k_idx),
        pruned=pruned,
    )
    before = batch.mask.sum(1).float()
    after = k_mask.sum(1).float()
    out.stats[stage] = {
        "tokens_in": float(before.mean()),
        "tokens_out": float(after.mean()),
        "kept_fraction": float((after / before.clamp(min=1)).mean()),
    }
    return out


def select_topk(batch: TokenBatch, scores: Tensor, ratio: float, stage: str) -> TokenBatch:
    """Keep ``budget(lengths, ratio)`` tokens per row by ``scores (B, N)``; original order kept."""
    keep = keep_mask_topk(scores.detach(), batch.mask, budget(batch.lengths, ratio))
    return split_by_mask(batch.replace(scores=scores), keep, stage)
