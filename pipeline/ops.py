"""Pure tensor functions shared by the stages: budgets, batched gather, top-k selection.

No Python loop over rows or tokens; every function works on ragged batches through ``mask``. No host
synchronisation either: shapes come from the input's shape and the ratio (:func:`static_budget`), never
from values on the device, and statistics stay 0-dim tensors (:func:`read_stats` turns them into floats
where someone reads them), so a stage can run under CUDA graphs and never stalls the launch queue.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .batch import PrunedTokens, TokenBatch, sort_key


def budget(lengths: Tensor, ratio: float) -> Tensor:
    """Tokens to keep per row: ``ceil(ratio * length)``, at least 1 for a non-empty row. (B,) long."""
    keep = torch.ceil(lengths.to(torch.float64) * ratio).long()
    return torch.minimum(torch.clamp(keep, min=1), lengths)


def static_budget(n: int, ratio: float) -> int:
    """The largest :func:`budget` of any row of a batch ``n`` tokens wide, from the shape alone (no device
    read): ``min(n, max(1, ceil(ratio * n)))``, 0 when ``n`` is 0. The width of a reducer's output."""
    return min(n, max(1, math.ceil(n * ratio))) if n else 0


def read_stats(stats: dict) -> dict:
    """``{stage: {name: value}}`` with every tensor value read as a float (one host read per value; call it
    where statistics are shown or logged, never inside a forward)."""
    return {stage: {k: float(v) for k, v in values.items()} for stage, values in stats.items()}


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


def sum_by_slot(values: Tensor, mask: Tensor, dest: Tensor) -> Tensor:
    """(B, N): at each slot, the sum of ``values`` (B, N) of the real tokens (``mask``) whose ``dest`` (B, N)
    is that slot (a merge's group sizes: ``TokenBatch.sizes`` after pooling or merging)."""
    return torch.zeros_like(values).scatter_add(1, dest, torch.where(mask, values, torch.zeros_like(values)))


def split_by_mask(batch: TokenBatch, keep: Tensor, stage: str, width: int | None = None,
                  drop_width: int | None = None) -> TokenBatch:
    """Keep the tokens where ``keep (B, N)`` is True, in original order; move the rest to ``pruned``.

    ``width``: the output length, an upper bound of the tokens any row keeps that the caller knows from
    shapes (e.g. :func:`static_budget`); then no value is read on the host. ``drop_width``: likewise for
    the tokens any row drops, the width of what this call adds to ``pruned`` (default ``N``; a stage that
    keeps exactly ``budget(lengths, ratio)`` of each row drops at most ``N - static_budget(N, ratio)``,
    since ``m - budget(m)`` grows with ``m``). A row keeping (dropping) more than its bound would lose
    tokens, so a caller must only pass true bounds.
    ``None``: the largest number kept in any row (and dropped, for ``pruned``), read from the device (a
    host synchronisation; for callers without a bound). Shorter rows are padded and masked.
    Row-aligned tensors (``scores``, ``features``, ``encoder_attention``, ``sizes``) follow the kept tokens; the dropped tokens'
    ``scores`` go to ``pruned.scores`` (None when the batch has no scores). ``stats[stage]``: ``tokens_in``,
    ``tokens_out`` (means per row) and ``kept_fraction``, 0-dim tensors.
    """
    keep = keep & batch.mask
    drop = batch.mask & ~keep
    if width is not None:
        n = keep.shape[1]
        n_keep, n_drop = min(width, n), n if drop_width is None else min(drop_width, n)
    else:
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
        scores=None if batch.scores is None else batch.scores.gather(1, d_idx),
    )
    pruned = dropped if batch.pruned is None else batch.pruned.cat(dropped)
    out = batch.replace(
        tokens=gather_rows(batch.tokens, k_idx),
        mask=k_mask,
        index=batch.index.gather(1, k_idx),
        scores=None if batch.scores is None else batch.scores.gather(1, k_idx),
        features=None if batch.features is None else gather_rows(batch.features, k_idx),
        encoder_attention=None if batch.encoder_attention is None else batch.encoder_attention.gather(1, k_idx),
        sizes=None if batch.sizes is None else batch.sizes.gather(1, k_idx) * k_mask,
        pruned=pruned,
    )
    before = batch.mask.sum(1).float()
    after = k_mask.sum(1).float()
    out.stats[stage] = {
        "tokens_in": before.mean().detach(),
        "tokens_out": after.mean().detach(),
        "kept_fraction": (after / before.clamp(min=1)).mean().detach(),
    }
    return out


def select_topk(batch: TokenBatch, scores: Tensor, ratio: float, stage: str) -> TokenBatch:
    """Keep ``budget(lengths, ratio)`` tokens per row by ``scores (B, N)``; original order kept."""
    keep = keep_mask_topk(scores.detach(), batch.mask, budget(batch.lengths, ratio))
    return split_by_mask(batch.replace(scores=scores), keep, stage, *budget_widths(keep.shape[1], ratio))


def budget_widths(n: int, ratio: float) -> tuple[int, int]:
    """``(width, drop_width)`` of :func:`split_by_mask` for a stage keeping exactly ``budget(lengths, ratio)``
    of each row of a batch ``n`` wide: ``static_budget(n, ratio)`` and ``n`` minus it."""
    w = static_budget(n, ratio)
    return w, n - w


def merge_into_kept(tokens: Tensor, keys: Tensor, mask: Tensor, keep: Tensor) -> Tensor:
    """Merge every real token outside ``keep`` into its most similar kept token of the same row.

    ``tokens (B, N, D)``, ``keys (B, N, S)`` (similarity: cosine of the keys), ``mask``/``keep``
    (B, N) bool. Each dropped real token joins the kept token of highest cosine similarity (ties:
    the earlier one); each kept token becomes the plain mean of itself and the tokens that joined
    it (ToMe's size-weighted average, every token of size 1). Returns (B, N, D): merged values at
    the kept positions, the input elsewhere (those are dropped next). Differentiable with respect
    to every real token; rows without a kept token are returned unchanged. Memory: (B, N, N).
    """
    b, n, _ = tokens.shape
    keep = keep & mask
    k = torch.nn.functional.normalize(keys.detach().float(), dim=-1)
    sim = (k @ k.transpose(1, 2)).masked_fill(~keep[:, None, :], float("-inf"))  # (B, N, N): to kept only
    pos = torch.arange(n, device=tokens.device).expand(b, n)
    target = torch.where(keep, pos, sim.argmax(-1))  # (B, N): a kept token is its own target
    w = (mask & keep.any(1, keepdim=True)).to(tokens.dtype)  # (B, N): real tokens of rows that keep any
    sums = torch.zeros_like(tokens).scatter_add(1, target[..., None].expand_as(tokens), tokens * w[..., None])
    counts = torch.zeros_like(w).scatter_add(1, target, w)  # (B, N)
    merged = sums / counts.clamp(min=1)[..., None]
    return torch.where(keep[..., None], merged, tokens)


# ---------------------------------------------------------------------------------------- pooling
def ceil_div(a: Tensor, b: Tensor | int) -> Tensor:
    """``ceil(a / b)`` for positive integer tensors."""
    return (a + b - 1) // b


def pool_kernel(layout: Tensor, keep: Tensor, max_side: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-row window ``(kt, k)`` for grid pooling, each (B,) long.

    ``k`` is the smallest square spatial kernel with ``T * ceil(H/k) * ceil(W/k) <= keep``.
    When even one window per frame is too many (``T > keep``), ``k`` covers the whole frame
    and ``kt = ceil(T / keep)`` frames are pooled together. Either way the number of windows of
    the original ``(T, H, W)`` grid never exceeds ``keep``.

    layout (B, 3) long ``(T, H, W)``; keep (B,) long; ``max_side``: a bound of every row's ``max(H, W)``
    known from shapes (a row of ``N`` tokens: ``N``); None reads it from ``layout`` (a host synchronisation).
    """
    if max_side is None:
        max_side = int(layout[:, 1:].max()) if layout.numel() else 1
    t, h, w = layout.clamp(min=1).unbind(1)  # (B,) each; clamp keeps empty rows harmless
    keep = keep.clamp(min=1)
    full = torch.maximum(h, w)
    # candidate kernels 1..max_side; the largest side is not read on the host: every kernel up to
    # ``max_side`` (the layouts' widest extent, a static bound) is tried, and a kernel wider than a row's
    # grid gives the same single window per frame as ``full``, so the first that fits is unchanged
    ks = torch.arange(1, max_side + 1, device=layout.device)  # (K,)
    cells = t[:, None] * ceil_div(h[:, None], ks) * ceil_div(w[:, None], ks)  # (B, K)
    fits = cells <= keep[:, None]
    spatial_ok = fits.any(1)
    # argmax of a bool row is its first True: the smallest fitting kernel
    k = torch.where(spatial_ok, fits.long().argmax(1) + 1, full)
    kt = torch.where(spatial_ok, torch.ones_like(t), ceil_div(t, keep))
    return kt, k


def pool_cells(index: Tensor, layout: Tensor, kt: Tensor, k: Tensor) -> Tensor:
    """Window id of each token, (B, N) long, row-major over the pooled grid.

    A token at original position ``index = t*H*W + h*W + w`` falls in window
    ``(t // kt, h // k, w // k)`` of the ``(ceil(T/kt), ceil(H/k), ceil(W/k))`` grid.
    index (B, N) long; layout (B, 3); kt, k (B,).
    """
    _, h, w = layout.clamp(min=1).unbind(1)
    hw = (h * w)[:, None]  # (B, 1)
    t_i, rem = index // hw, index % hw  # (B, N)
    h_i, w_i = rem // w[:, None], rem % w[:, None]  # (B, N)
    ch, cw = ceil_div(h, k)[:, None], ceil_div(w, k)[:, None]  # (B, 1) pooled grid height, width
    kt, k = kt[:, None], k[:, None]
    return (t_i // kt) * (ch * cw) + (h_i // k) * cw + w_i // k


def window_mean(x: Tensor, mask: Tensor, cell: Tensor, n_cells: int) -> Tensor:
    """Masked mean of ``x (B, N, ...)`` over tokens sharing a window ``cell (B, N)``.

    Returns ``(B, n_cells, ...)``; an empty window is 0. Padding (``mask`` False) contributes
    nothing, whatever its value (it is zeroed before the sum, so inf/NaN padding is harmless).
    """
    b, n = mask.shape
    tail = x.shape[2:]
    m = mask.view(b, n, *([1] * len(tail)))
    values = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    cell = torch.where(mask, cell, torch.zeros_like(cell))
    sums = x.new_zeros(b, n_cells, *tail).scatter_add(
        1, cell.view(b, n, *([1] * len(tail))).expand_as(values), values
    )  # (B, C, ...)
    counts = x.new_zeros(b, n_cells).scatter_add(1, cell, mask.to(x.dtype))  # (B, C)
    return sums / counts.clamp(min=1).view(b, n_cells, *([1] * len(tail)))


def pool_grid(batch: TokenBatch, ratio: float, stage: str) -> TokenBatch:
    """Average-pool each row on its original grid so it keeps at most ``budget(lengths, ratio)`` tokens.

    Each row's window is chosen by :func:`pool_kernel` from its own layout (rows with different
    grids share one batch). An output token is the masked mean of the real tokens present in
    its window (tokens an earlier reducer removed are simply absent); its ``index`` is the
    smallest original index in the window, and outputs are in ascending ``index``. The
    window's other tokens go to ``pruned`` unchanged, so kept ∪ pruned covers every input
    token by index. ``features``, ``scores`` and ``encoder_attention`` are pooled like the tokens; ``sizes``
    (when an earlier stage set them) are summed over the window.

    Windows are counted on the full original grid, so after an earlier reducer a row may end
    up with fewer tokens than the budget (never more).
    """
    keep = budget(batch.lengths, ratio)
    n = batch.mask.shape[1]  # windows <= keep <= N, so N cells always suffice
    # kernels up to N are tried (static); a row whose grid side exceeds N (an earlier reducer left fewer
    # tokens than its grid has) and fits no kernel up to N pools its whole frame, never more than the budget
    kt, k = pool_kernel(batch.layout, keep, max_side=max(n, 1))
    cell = torch.where(batch.mask, pool_cells(batch.index, batch.layout, kt, k), 0)  # (B, N)
    key = sort_key(batch.index, batch.mask)
    first = torch.full_like(key, torch.iinfo(torch.long).max).scatter_reduce(
        1, cell, key, reduce="amin"
    )  # (B, N) smallest original index per window
    representative = batch.mask & (batch.index == first.gather(1, cell))
    out = split_by_mask(batch, representative, stage, static_budget(n, ratio))  # windows <= keep <= that

    out_cell = torch.where(out.mask, pool_cells(out.index, batch.layout, kt, k), 0)  # (B, K)

    def pooled(x: Tensor | None) -> Tensor | None:
        if x is None:
            return None
        return gather_rows(window_mean(x, batch.mask, cell, n), out_cell)

    sizes = None
    if batch.sizes is not None:  # a window stands for every input token its members stood for
        sizes = sum_by_slot(batch.sizes, batch.mask, cell).gather(1, out_cell) * out.mask
    out = out.replace(tokens=pooled(batch.tokens), features=pooled(batch.features), scores=pooled(batch.scores),
                      encoder_attention=pooled(batch.encoder_attention), sizes=sizes)
    out.stats[stage]["kernel"] = k.float().mean()
    out.stats[stage]["time_kernel"] = kt.float().mean()
    return out
