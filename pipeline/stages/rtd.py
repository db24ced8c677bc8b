"""``rtd``: DeFT's Recovery of pruned Tokens through a Dictionary (information bottleneck).

Reference: Liu & Yu, "DeFT: Decoupled and Feedback-Guided Tokenization for Efficient Multimodal
Long-Context Modeling", ICML 2025 (New In ML), https://dev.icml.cc/virtual/2025/50483 .

The reducers before this stage (``fgcs``, ``random``, ...) leave what they removed in
``batch.pruned``; RTD stores each pruned token as a ``D // bottleneck_ratio`` code (the
dictionary entry) and, depending on ``mode``, reconstructs some of them and puts them back
among the retained tokens before the LLM.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

import torch
from pydantic import Field
from torch import Tensor, nn

from ..batch import PrunedTokens, TokenBatch, sort_key
from ..ops import budget, gather_rows, keep_mask_topk, static_budget
from ..registry import register
from ..types import NonNegFloat, Ratio

Mode = Literal["fast", "hybrid", "adaptive"]
MODES: tuple[str, ...] = get_args(Mode)


# ------------------------------------------------------------------------------ pure functions
def pruned_uncertainty(scores: Tensor, mask: Tensor, pruned_scores: Tensor, pruned_mask: Tensor) -> Tensor:
    """How little a row's scores separate its kept tokens from its pruned ones, (B,) float.

    ``u = (softmax mass over the row's real scores, kept ∪ pruned, on pruned tokens) /
    (pruned fraction of the row)``. ``u ≈ 1``: the scores are about flat, the reducer's choice
    was close to arbitrary; ``u → 0``: the pruned tokens had far lower scores than the kept
    ones. Rows with nothing pruned get ``u = 0``. Padding never contributes.

    scores (B, N), mask (B, N) bool: the retained tokens; pruned_scores (B, P), pruned_mask (B, P).
    """
    s = torch.cat([scores, pruned_scores], dim=1).float()  # (B, N + P)
    m = torch.cat([mask, pruned_mask], dim=1)  # (B, N + P)
    s = torch.where(m, s, torch.full_like(s, float("-inf")))
    # shift by the row max over real scores; an empty row is all -inf, so shift by 0 there
    top = s.amax(dim=1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(s - top)  # (B, N + P), exactly 0 on padding
    n_kept = scores.shape[1]
    mass = e[:, n_kept:].sum(1) / e.sum(1).clamp(min=torch.finfo(e.dtype).tiny)  # (B,)
    n_pruned = pruned_mask.sum(1)
    frac = n_pruned.float() / m.sum(1).clamp(min=1).float()  # (B,)
    return torch.where(n_pruned > 0, mass / frac.clamp(min=torch.finfo(frac.dtype).tiny), torch.zeros_like(mass))


def recovery_mask(pruned_scores: Tensor, pruned_mask: Tensor, ratio: float, rows: Tensor) -> Tensor:
    """Bool (B, P): the ``ceil(ratio * n_pruned)`` best-scoring pruned tokens of each row in ``rows``.

    Ties: earlier slot (= smaller original index) wins. rows (B,) bool; other rows get nothing.
    """
    count = budget(pruned_mask.sum(1), ratio)  # (B,)
    count = torch.where(rows, count, torch.zeros_like(count))
    return keep_mask_topk(pruned_scores.detach(), pruned_mask, count)


def merge_recovered(batch: TokenBatch, values: Tensor, rec_idx: Tensor, rec_mask: Tensor) -> TokenBatch:
    """Put recovered tokens back among the retained ones, ascending by original index.

    values (B, R, D): the recovered tokens' new values; rec_idx (B, R) long: their slots in
    ``batch.pruned``; rec_mask (B, R) bool: which of the R are real. Recovered tokens leave
    ``pruned`` (compacted, padding last); their ``scores`` are their pruned scores (output
    ``scores`` is None when ``batch.scores`` is). ``features`` becomes None (pruned tokens
    have no stored features); ``sizes``, when set, give each recovered token size 1.
    """
    pruned = batch.pruned
    index = torch.cat([batch.index, pruned.index.gather(1, rec_idx)], dim=1)  # (B, N + R)
    mask = torch.cat([batch.mask, rec_mask], dim=1)  # (B, N + R)
    order = sort_key(index, mask).argsort(dim=1, stable=True)  # (B, N + R): static width, padding last
    tokens = torch.cat([batch.tokens, values.to(batch.tokens.dtype)], dim=1)  # (B, N + R, D)
    scores = None
    if batch.scores is not None and pruned.scores is not None:
        scores = torch.cat([batch.scores, pruned.scores.gather(1, rec_idx)], dim=1).gather(1, order)
    sizes = None
    if batch.sizes is not None:  # a recovered token stands for itself
        sizes = torch.cat([batch.sizes, rec_mask.to(batch.sizes.dtype)], dim=1).gather(1, order)

    # what stays pruned, compacted in original order (padding last)
    recovered = torch.zeros_like(pruned.mask).scatter(1, rec_idx, rec_mask)  # (B, P)
    left = pruned.mask & ~recovered
    keep = sort_key(pruned.index, left).argsort(dim=1, stable=True)  # (B, P), padding last
    remaining = PrunedTokens(
        tokens=gather_rows(pruned.tokens, keep),
        mask=left.gather(1, keep),
        index=pruned.index.gather(1, keep),
        scores=None if pruned.scores is None else pruned.scores.gather(1, keep),
    )
    return batch.replace(
        tokens=gather_rows(tokens, order),
        mask=mask.gather(1, order),
        index=index.gather(1, order),
        scores=scores,
        features=None,
        encoder_attention=None,  # the recovered tokens have none
        sizes=sizes,
        pruned=remaining,
    )


# ------------------------------------------------------------------------------------- stage
@register("rtd")
class RTD(nn.Module):
    """Recover pruned tokens through an information bottleneck (DeFT's RTD).

    Dictionary: each pruned token ``x (D,)`` is stored as ``compress(x) = W_e x + b_e`` of width
    ``D // bottleneck_ratio`` (at least 1) and rebuilt by ``reconstruct(z) = Linear(D, D)(GELU(
    Linear(D // r, D)(z)))``. Needs a reducer before it (``needs_pruned``); with
    ``batch.pruned`` None the batch is returned unchanged.

    Modes (``self.mode`` is a plain attribute, change it at eval time with :meth:`set_mode`):

    - ``fast``: output = the retained tokens unchanged; the stage only adds the training loss.
    - ``hybrid``: each row gets back its ``ceil(recover_ratio * n_pruned)`` pruned tokens with
      the highest ``pruned.scores`` (ties: smaller original index), valued
      ``reconstruct(compress(x))``, merged with the retained tokens in ascending original index.
    - ``adaptive``: per row, ``u`` = softmax mass of the row's real scores (kept ∪ pruned) on
      pruned tokens / pruned fraction (see :func:`pruned_uncertainty`); rows with
      ``u > adaptive_threshold`` are recovered as in ``hybrid``, the others as in ``fast``.

    ``hybrid``/``adaptive`` need ``pruned.scores`` (``adaptive`` also ``batch.scores``) and raise
    ``ValueError`` without them (e.g. after ``pool``). Shapes: input ``(B, N, D)`` with
    ``pruned (B, P, D)`` -> output ``(B, K, D)``, ``K`` = most kept + recovered tokens of any row,
    ``pruned (B, P', D)`` what was not recovered; recovered tokens' ``scores`` are their pruned
    scores. In ``hybrid``/``adaptive`` ``features`` is set to None (pruned tokens' features are
    not stored; rtd is the last stage before the LLM); ``fast`` leaves it as is.

    Training: ``losses["rtd_recon"] = recon_weight * MSE(reconstruct(compress(x)), x)`` with ``x`` detached
    over the real pruned tokens (0, still attached to the parameters, when a batch pruned
    nothing). ``stats["rtd"]``: ``tokens_in``, ``tokens_out`` (mean per row), ``recovered``
    (mean recovered tokens per row), ``recovered_rows`` (fraction of rows that got at least one
    token back), and in ``adaptive`` ``uncertainty`` (mean ``u``).
    """

    selects_tokens = False  # recovered tokens are reconstructions, not input rows
    needs_pruned = True  # acts on what an earlier reducer put in ``batch.pruned``

    def __init__(
        self,
        dim: int,
        mode: Mode = "fast",
        bottleneck_ratio: Annotated[int, Field(gt=1)] = 4,  # > 1: the code must be narrower than D
        recover_ratio: Ratio = 0.25,
        adaptive_threshold: NonNegFloat = 0.5,
        recon_weight: NonNegFloat = 1.0,
    ):
        super().__init__()
        self.set_mode(mode)
        self.recover_ratio = recover_ratio
        self.adaptive_threshold = adaptive_threshold
        self.recon_weight = recon_weight
        self.bottleneck_dim = max(dim // bottleneck_ratio, 1)
        self.encoder = nn.Linear(dim, self.bottleneck_dim)
        self.decoder = nn.Sequential(nn.Linear(self.bottleneck_dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown rtd mode {mode!r}; allowed modes: {list(MODES)}")
        self.mode = mode

    def compress(self, x: Tensor) -> Tensor:
        """Dictionary codes: (..., D) -> (..., D // bottleneck_ratio)."""
        return self.encoder(x)

    def reconstruct(self, z: Tensor) -> Tensor:
        """Tokens from codes: (..., D // bottleneck_ratio) -> (..., D)."""
        return self.decoder(z)

    def _recover_rows(self, batch: TokenBatch) -> tuple[Tensor, Tensor | None]:
        """Rows (B,) bool that get tokens back in the current mode, and ``u`` (adaptive only)."""
        pruned = batch.pruned
        b = pruned.mask.shape[0]
        if self.mode == "fast":
            return torch.zeros(b, dtype=torch.bool, device=pruned.mask.device), None
        needed = [("batch.pruned.scores", pruned.scores)]
        if self.mode == "adaptive":
            needed.append(("batch.scores", batch.scores))
        for what, value in needed:
            if value is None:
                raise ValueError(
                    f"rtd mode {self.mode!r} needs {what}, which is None: the tokens were pruned by a "
                    "stage without scores (e.g. 'pool'); put a scoring reducer such as 'fgcs' right "
                    "before 'rtd', or use mode='fast'"
                )
        if self.mode == "hybrid":
            return torch.ones(b, dtype=torch.bool, device=pruned.mask.device), None
        u = pruned_uncertainty(batch.scores.detach(), batch.mask, pruned.scores.detach(), pruned.mask)
        return u > self.adaptive_threshold, u

    def forward(self, batch: TokenBatch) -> TokenBatch:
        if self.mode not in MODES:  # ``mode`` is a plain attribute; catch a bad assignment here
            raise ValueError(f"unknown rtd mode {self.mode!r}; allowed modes: {list(MODES)}")
        if batch.pruned is None:
            return batch
        pruned = batch.pruned
        rows, u = self._recover_rows(batch)
        # padding slots of ``pruned`` hold arbitrary rows; zero them so they stay finite and inert
        x = torch.where(pruned.mask.unsqueeze(-1), pruned.tokens, torch.zeros_like(pruned.tokens))  # (B, P, D)

        losses = dict(batch.losses)
        rebuilt = None
        if self.training:
            # the input is detached too: the loss trains the bottleneck, never reshapes the tokens upstream
            rebuilt = self.reconstruct(self.compress(x.detach()))  # (B, P, D)
            err = (rebuilt - x.detach()).pow(2).mean(-1)  # (B, P)
            err = torch.where(pruned.mask, err, torch.zeros_like(err))
            loss = self.recon_weight * err.sum() / pruned.mask.sum().clamp(min=1)
            losses["rtd_recon"] = losses["rtd_recon"] + loss if "rtd_recon" in losses else loss

        if self.mode == "fast":
            out = batch.replace(losses=losses)
            recovered = torch.zeros_like(batch.lengths)
        else:
            sel = recovery_mask(pruned.scores, pruned.mask, self.recover_ratio, rows)  # (B, P)
            recovered = sel.sum(1)
            r = static_budget(sel.shape[1], self.recover_ratio)  # >= every row's count, from the shape alone
            rec_idx = sort_key(pruned.index, sel).argsort(dim=1, stable=True)[:, :r]  # (B, R)
            rec_mask = sel.gather(1, rec_idx)  # (B, R)
            if rebuilt is not None:
                values = gather_rows(rebuilt, rec_idx)  # (B, R, D)
            else:  # eval: run the bottleneck on the recovered tokens only
                values = self.reconstruct(self.compress(gather_rows(x, rec_idx)))
            out = merge_recovered(batch.replace(losses=losses), values, rec_idx, rec_mask)

        stats = {  # 0-dim tensors (pipeline.ops.read_stats reads them)
            "tokens_in": batch.lengths.float().mean(),
            "tokens_out": out.lengths.float().mean(),
            "recovered": recovered.float().mean(),
            "recovered_rows": (recovered > 0).float().mean(),
        }
        if u is not None:
            stats["uncertainty"] = u.detach().float().mean()
        out.stats[self.stage_name] = stats
        return out

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, bottleneck_dim={self.bottleneck_dim}, recover_ratio={self.recover_ratio}"
