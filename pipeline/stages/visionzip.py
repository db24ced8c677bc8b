"""``visionzip``: keep the tokens the vision encoder attends to most, merge the rest into a few.

Reference: Yang, Chen, Tian, Wang, Li, Jiang & Jia, "VisionZip: Longer is Better but Not Necessary in
Vision Language Models", CVPR 2025, https://arxiv.org/abs/2412.04467 (code: github.com/dvlab-research/VisionZip).

Per row, of the ``total = ceil(retention_ratio * n)`` tokens kept:

1. ``K = min(total, ceil(dominant_share * total))`` *dominant* tokens: the real tokens with the
   highest dominance score (ties: the earlier token). With ``dominance="encoder"`` (default) the score
   is ``batch.encoder_attention``: the attention each token received in the vision encoder's feature
   layer, from the CLS token, or averaged over all queries when the encoder has no CLS token, averaged
   over heads (the image tower computes it when a stage declares ``needs_encoder_attention``; see
   ``llava_deft.encoders.image``). A batch without it raises ``ValueError``. ``dominance="norm"`` uses
   the L2 norm of each token instead, for pipelines run standalone on plain tokens (not the paper's).
2. ``C = total - K`` *contextual* tokens: among the ``R`` remaining real tokens, in original order,
   the centres are those of rank ``0, s, 2s, ..., (C-1)s`` with ``s = max(1, R // C)`` (VisionZip's
   uniform pick); every other remaining token joins its most similar centre (cosine similarity of
   the tokens, i.e. the dot product of normalised tokens as in VisionZip; ties: the earlier centre),
   and each centre becomes the plain mean of its group (itself included). VisionZip's code adds the
   centre to the mean of the tokens that joined it; here the group is averaged, as the mean keeps the
   token's scale. ``features`` and ``encoder_attention`` are averaged over the same groups.

The defaults are the paper's LLaVA-1.5 setting: 54 dominant + 10 contextual of 576 tokens
(``retention_ratio = 0.111``, ``ceil(0.111 * 576) = 64``; ``dominant_share = 54/64``). VisionZip
selects inside the encoder on its keys; here the selection acts on the projected tokens the
pipeline receives (dominance still from the encoder), and outputs stay in ascending original
``index`` (a contextual token at its centre's index), as every stage's. A video row is one row: its
budget and picks span all its frames. ``batch.scores`` is set to the dominance score. Merged-away
and unselected tokens go to ``pruned`` with their own values. No parameters; ``dim`` is accepted
for a uniform builder call and unused. Memory: ``(B, N, N)`` similarities.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..batch import TokenBatch
from ..ops import budget, keep_mask_topk, split_by_mask, static_budget
from ..registry import register
from ..types import Ratio
from .tome import group_mean, group_sizes


def visionzip_groups(
    dominance: Tensor, keys: Tensor, mask: Tensor, total: Tensor, dominant_share: float
) -> tuple[Tensor, Tensor, Tensor]:
    """VisionZip's selection on a ragged batch.

    ``dominance (B, N)`` float, ``keys (B, N, S)`` (padding ignored, whatever its value), ``mask (B, N)``
    bool with real tokens in original order along N, ``total (B,)`` long (at most the real tokens).
    Returns ``dominant (B, N)`` bool, ``centre (B, N)`` bool and ``dest (B, N)`` long: the slot whose
    group each real token joins (dominant tokens and centres: their own; a remaining token of a row
    without centres: its own, and it is dropped).
    """
    b, n = mask.shape
    dev = mask.device
    n_dom = torch.minimum(torch.ceil(total.to(torch.float64) * dominant_share).long(), total)  # (B,)
    n_ctx = total - n_dom  # (B,)
    neg = torch.finfo(torch.float32).min
    score = torch.where(mask, dominance.detach().float(), torch.full((), neg, device=dev))
    dominant = keep_mask_topk(score, mask, n_dom)
    remaining = mask & ~dominant
    rank = remaining.long().cumsum(1) - 1  # (B, N) rank among the remaining
    n_rem = remaining.sum(1)  # (B,)
    step = torch.clamp(n_rem // n_ctx.clamp(min=1), min=1)[:, None]  # (B, 1)
    centre = remaining & (rank % step == 0) & (rank // step < n_ctx[:, None])
    dtype = torch.promote_types(keys.dtype, torch.float32)
    k = torch.where(mask[..., None], keys.detach().to(dtype), torch.zeros((), dtype=dtype, device=dev))
    k = F.normalize(k, dim=-1)
    sim = (k @ k.transpose(1, 2)).masked_fill(~centre[:, None, :], float("-inf"))  # (B, N, N): to centres only
    pos = torch.arange(n, device=dev).expand(b, n)
    joins = remaining & ~centre & centre.any(1, keepdim=True)
    dest = torch.where(joins, sim.argmax(-1), pos)  # argmax: the first maximum on ties
    return dominant, centre, dest


@register("visionzip")
class VisionZip(nn.Module):
    """Keep ``ceil(retention_ratio * n)`` tokens per row: dominant ones by encoder attention plus
    contextual merges of the rest (see the module docstring).

    ``dominant_share``: fraction of the budget given to dominant tokens (``ceil``); the rest are
    contextual. ``dominance``: ``"encoder"`` reads ``batch.encoder_attention`` (which the model's image
    tower provides; missing: ``ValueError``); ``"norm"`` ranks by token L2 norm (standalone use).
    """

    selects_tokens = False  # contextual tokens are group means

    def __init__(
        self,
        dim: int | None = None,
        retention_ratio: Ratio = 0.111,
        dominant_share: Ratio = 54 / 64,
        dominance: Literal["encoder", "norm"] = "encoder",
    ):
        super().__init__()
        self.retention_ratio = retention_ratio
        self.dominant_share = dominant_share
        self.dominance = dominance
        self.needs_encoder_attention = dominance == "encoder"
        """Read by the model: its image tower then sets ``TokenBatch.encoder_attention``."""
        if dominant_share == 1:
            self.selects_tokens = True  # no contextual tokens: every output is an input row

    def dominance_scores(self, batch: TokenBatch) -> Tensor:
        """(B, N) float: the score that ranks dominant tokens."""
        if self.dominance == "norm":
            return batch.tokens.detach().float().norm(dim=-1)
        if batch.encoder_attention is None:
            raise ValueError(
                "visionzip (dominance='encoder') needs the vision encoder's attention per token, but the batch has "
                "no `encoder_attention`: the model must provide it (LlavaDeftForCausalLM's image tower sets it for "
                "the timm backend when the pipeline holds visionzip), or pass it to TokenBatch.from_tokens("
                "encoder_attention=...); for plain tokens use dominance='norm'"
            )
        return batch.encoder_attention.detach().float()

    def forward(self, batch: TokenBatch) -> TokenBatch:
        score = self.dominance_scores(batch)
        total = budget(batch.lengths, self.retention_ratio)
        dominant, centre, dest = visionzip_groups(score, batch.tokens, batch.mask, total, self.dominant_share)

        def merged(x: Tensor | None) -> Tensor | None:
            if x is None:
                return None
            mean, _ = group_mean(x, batch.mask, dest)
            return torch.where(centre.view(*centre.shape, *([1] * (x.dim() - 2))), mean, x)

        out = split_by_mask(
            batch.replace(
                tokens=merged(batch.tokens), features=merged(batch.features), scores=score,
                encoder_attention=merged(batch.encoder_attention),
                sizes=group_sizes(batch.sizes, batch.mask, dest, centre),
            ),
            dominant | centre,
            self.stage_name,
            static_budget(batch.mask.shape[1], self.retention_ratio),  # dominant + contextual = the budget
        )
        out.stats[self.stage_name]["dominant"] = dominant.sum(1).float().mean()
        out.stats[self.stage_name]["contextual"] = centre.sum(1).float().mean()
        return out
