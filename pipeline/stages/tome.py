"""``tome``: Token Merging by bipartite soft matching, size-weighted, down to the token budget.

Reference: Bolya, Fu, Dai, Zhang, Feichtenhofer & Hoffman, "Token Merging: Your ViT But Faster",
ICLR 2023, https://arxiv.org/abs/2210.09461 .

ToMe merges ``r`` tokens per transformer block; here the same matching runs in rounds on the media
tokens before the LLM until each row holds ``ceil(retention_ratio * n)`` tokens. One round, per row:

1. the row's current tokens, in ascending original index, alternate into sets A (1st, 3rd, ...)
   and B (2nd, 4th, ...);
2. each A token finds its most similar B token (cosine similarity of the keys: the tokens, or the
   ``sam`` features with ``use_features``; ties: the earlier B token);
3. the ``r = min(current - budget, current // 2)`` A tokens with the highest similarity (ties: the
   earlier A token) merge into their B partners; a B token that receives merges becomes the
   size-weighted average of itself and them, its size the sum of theirs (every input token has
   size 1). The keys merge alike, so the next round matches the merged tokens.

A merged token keeps the original index of its B destination, so the output stays in ascending
``index``. A size-weighted average of size-weighted averages is the plain mean of the original
tokens, so each output token is the mean of the input tokens merged into it (computed once, after
the matching; it is differentiable in every real token; the matching itself is not). ``features`` and
``scores`` are averaged over the same groups. The merged-away tokens go to ``pruned`` with their own
values. Every round is batched over rows and tokens; rows with different budgets take different
``r``. Each round halves a row at most, so a row needs about ``log2(1 / retention_ratio) + 1``
rounds; the loop over rounds is the only Python loop. Memory per round: ``(B, N/2, N/2)``.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..batch import TokenBatch, sort_key
from ..ops import budget, budget_widths, gather_rows, split_by_mask, static_budget, sum_by_slot
from ..registry import register
from ..types import Ratio


@lru_cache(maxsize=256)
def round_plan(n: int, ratio: float) -> tuple[int, ...]:
    """From shapes alone: a bound of every row's token count before each matching round, one entry per round.

    A row of ``m <= n`` real tokens keeping ``k_m = static_budget(m, ratio)`` goes from ``c`` to
    ``max(k_m, ceil(c / 2))`` tokens a round; that map is monotone in ``m`` and ``c``, so the row of ``n``
    tokens bounds every row before every round (and with it the A and B set sizes). The plan runs the
    most rounds any ``m`` needs (budgets round up, so a shorter row may need one more); a finished row
    merges nothing in a further round.
    """
    def rounds(m: int) -> int:
        k, c, r = static_budget(m, ratio), m, 0
        while c > k:
            c, r = max(k, c - c // 2), r + 1
        return r

    keep, c, plan = static_budget(n, ratio), n, []
    for _ in range(max((rounds(m) for m in range(1, n + 1)), default=0)):
        plan.append(c)
        c = max(keep, c - c // 2)
    return tuple(plan)


def tome_groups(keys: Tensor, mask: Tensor, keep: Tensor, ratio: float | None = None) -> tuple[Tensor, Tensor, int]:
    """Bipartite soft matching rounds until row ``b`` holds ``keep[b]`` tokens.

    ``keys (B, N, S)`` (padding ignored, whatever its value), ``mask (B, N)`` bool with real tokens in
    ascending original order along N, ``keep (B,)`` long. Returns ``dest (B, N)`` long, the slot each
    real token finally belongs to (padding: its own slot); ``alive (B, N)`` bool, the slots that
    survive (exactly ``min(keep[b], n_b)`` per row); and the number of rounds run.

    ``ratio`` (``keep`` is ``budget(lengths, ratio)``): the rounds and the A/B set sizes come from the
    shape (:func:`round_plan`), nothing is read on the host and every round has static shapes. None:
    rounds run until no row merges and the set sizes are read from the device (host synchronisations).
    """
    b, n = mask.shape
    dev = mask.device
    dtype = torch.promote_types(keys.dtype, torch.float32)
    slot = torch.arange(n, device=dev).expand(b, n)
    big = torch.iinfo(torch.long).max // 2
    # size-weighted key sums: their direction is the direction of the size-weighted mean
    ksum = torch.where(mask[..., None], keys.detach().to(dtype), torch.zeros((), dtype=dtype, device=dev))
    alive = mask.clone()
    dest = slot.clone()
    rounds = 0
    plan = None if ratio is None else round_plan(n, float(ratio))
    while True:
        cur = alive.sum(1)  # (B,)
        r = torch.minimum(cur - keep, cur // 2).clamp(min=0)  # (B,) merges this round
        if plan is None:
            if not bool((r > 0).any()):
                break
            n_a, n_b = int((cur - cur // 2).max()), int((cur // 2).max())
        else:
            if rounds == len(plan):
                break
            n_a, n_b = plan[rounds] - plan[rounds] // 2, plan[rounds] // 2
        rounds += 1
        rank = alive.long().cumsum(1) - 1  # (B, N) position among the row's current tokens
        is_a, is_b = alive & (rank % 2 == 0), alive & (rank % 2 == 1)
        a_slots = torch.where(is_a, rank // 2, big).argsort(dim=1, stable=True)[:, :n_a]  # (B, Na) A in order
        b_slots = torch.where(is_b, rank // 2, big).argsort(dim=1, stable=True)[:, :n_b]  # (B, Nb) B in order
        a_ok, b_ok = is_a.gather(1, a_slots), is_b.gather(1, b_slots)
        ka = F.normalize(gather_rows(ksum, a_slots), dim=-1)
        kb = F.normalize(gather_rows(ksum, b_slots), dim=-1)
        sim = (ka @ kb.transpose(1, 2)).masked_fill(~b_ok[:, None, :], float("-inf"))  # (B, Na, Nb)
        best, partner = sim.max(-1)  # (B, Na): first maximum on ties
        best = best.masked_fill(~a_ok, float("-inf"))
        order = best.argsort(dim=1, descending=True, stable=True)  # earlier A wins ties
        a_rank = torch.empty_like(order).scatter_(1, order, torch.arange(n_a, device=dev).expand_as(order))
        merge = a_ok & (a_rank < r[:, None])  # (B, Na)
        if plan is None and not bool(merge.any()):  # cannot happen (r <= |A|); a guard against looping forever
            raise RuntimeError("tome: a matching round merged nothing; the keys may hold NaN")
        target = torch.where(merge, b_slots.gather(1, partner), a_slots)  # (B, Na) slot each A goes to
        step = slot.clone().scatter_(1, a_slots, target)  # (B, N): a_slots is a permutation prefix, no clash
        ksum = torch.zeros_like(ksum).scatter_add(1, step[..., None].expand_as(ksum), ksum)
        alive = alive & ~torch.zeros_like(alive).scatter_(1, a_slots, merge)
        dest = step.gather(1, dest)
    return dest, alive, rounds


def group_mean(x: Tensor, mask: Tensor, dest: Tensor) -> tuple[Tensor, Tensor]:
    """Mean of ``x (B, N, ...)`` over the real tokens sharing a ``dest`` slot, and the group sizes (B, N)."""
    b, n = mask.shape
    tail = x.shape[2:]
    m = mask.view(b, n, *([1] * len(tail)))
    values = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    idx = dest.view(b, n, *([1] * len(tail))).expand_as(values)
    sums = torch.zeros_like(values).scatter_add(1, idx, values)
    count = torch.promote_types(x.dtype, torch.float32)  # sizes stay exact integers in bf16 runs
    sizes = torch.zeros(b, n, dtype=count, device=x.device).scatter_add(1, dest, mask.to(count))
    mean = sums.to(count) / sizes.clamp(min=1).view(b, n, *([1] * len(tail)))
    return mean.to(x.dtype), sizes


def group_sizes(sizes: Tensor | None, mask: Tensor, dest: Tensor, merged: Tensor) -> Tensor | None:
    """``TokenBatch.sizes`` after a merge: where ``merged`` (B, N), the sum of the sizes of the real tokens
    sharing that ``dest`` slot; elsewhere a token's own. None stays None (no stage asked for sizes)."""
    if sizes is None:
        return None
    return torch.where(merged, sum_by_slot(sizes, mask, dest), sizes)


@register("tome")
class TokenMerging(nn.Module):
    """Merge each row to ``ceil(retention_ratio * n)`` tokens by ToMe's size-weighted bipartite matching.

    ``use_features``: match on the cosine similarity of ``batch.features`` (written by ``sam``) instead
    of the tokens. Output tokens are means of the input tokens merged into them, at the index of
    their B destination, ascending; ``pruned`` holds the merged-away tokens. No parameters;
    ``dim`` is accepted for a uniform builder call and unused. :meth:`merge` also returns each
    output token's size (how many input tokens it stands for).
    """

    selects_tokens = False  # output tokens are means of merged groups

    def __init__(self, dim: int | None = None, retention_ratio: Ratio = 0.25, use_features: bool = False):
        super().__init__()
        self.retention_ratio = retention_ratio
        self.use_features = use_features

    def _keys(self, batch: TokenBatch) -> Tensor:
        if not self.use_features:
            return batch.tokens
        if batch.features is None:
            raise ValueError("tome was built with use_features=True but the batch has no `features`; "
                             "put a feature stage such as 'sam' before it")
        return batch.features

    def merge(self, batch: TokenBatch) -> tuple[TokenBatch, Tensor]:
        """The merged batch and the size of each output token, ``(B, K)`` (0 on padding)."""
        dest, alive, rounds = tome_groups(self._keys(batch), batch.mask, budget(batch.lengths, self.retention_ratio),
                                          self.retention_ratio)

        def merged(x: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
            if x is None:
                return None, None
            mean, sizes = group_mean(x, batch.mask, dest)
            at = alive.view(*alive.shape, *([1] * (x.dim() - 2)))
            return torch.where(at, mean, x), sizes  # dropped slots keep their own values (for ``pruned``)

        tokens, sizes = merged(batch.tokens)
        features, _ = merged(batch.features)
        scores, _ = merged(batch.scores)
        attention, _ = merged(batch.encoder_attention)
        out = split_by_mask(batch.replace(tokens=tokens, features=features, scores=scores, encoder_attention=attention,
                                          sizes=group_sizes(batch.sizes, batch.mask, dest, alive)),
                            alive, self.stage_name, *budget_widths(batch.mask.shape[1], self.retention_ratio))
        # split_by_mask keeps the alive slots in ascending index: the same order gives their sizes
        k = out.mask.shape[1]
        kept_slots = sort_key(batch.index, alive).argsort(dim=1, stable=True)[:, :k]
        out_sizes = sizes.gather(1, kept_slots) * out.mask
        out.stats[self.stage_name]["rounds"] = torch.full((), float(rounds))  # a host int, kept on the CPU: no copy
        return out, out_sizes

    def forward(self, batch: TokenBatch) -> TokenBatch:
        return self.merge(batch)[0]
