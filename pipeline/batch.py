"""The one data structure that flows through every reduction stage.

A :class:`TokenBatch` holds a ragged batch of token sequences padded to a common
length ``N``.  Rows are media items (one image, one video, one audio clip or one
text passage); padding is expressed by ``mask``.  Stages never change ``D``.

Shapes (``B`` rows, ``N`` padded length, ``D`` width, ``S`` semantic width)::

    tokens    (B, N, D)  float
    mask      (B, N)     bool   True for a real token
    index     (B, N)     long   position of each token in the ORIGINAL sequence,
                                ascending along N for real tokens (RoPE uses it)
    modality  (B,)       long   one :class:`Modality` code per row
    layout    (B, 3)     long   original grid (T, H, W); T*H*W == original length
    scores    (B, N)     float  set by the last scorer (higher = keep)
    features  (B, N, S)  float  semantic features set by ``sam``
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field

import torch
from torch import Tensor


class Modality(enum.IntEnum):
    IMAGE = 0
    VIDEO = 1
    AUDIO = 2
    TEXT = 3


@dataclass
class PrunedTokens:
    """Tokens a reducer removed, kept so that a recovery stage (RTD) can bring some back.

    tokens (B, P, D); mask (B, P) bool; index (B, P) long (original positions, ascending);
    scores (B, P) float or None: the ``batch.scores`` the reducer had for each token when it
    pruned it (None when it had none, e.g. ``pool`` as the first stage). Tokens pruned by
    different stages carry different stages' scores, so compare them across stages with care.
    """

    tokens: Tensor
    mask: Tensor
    index: Tensor
    scores: Tensor | None = None

    def cat(self, other: "PrunedTokens") -> "PrunedTokens":
        """Concatenate along P and re-sort each row by original index (padding last).

        ``scores`` is kept only when both sides have it: a token without a score cannot be
        ranked against the others, so the result has ``scores=None`` if either side lacks it.
        """
        tokens = torch.cat([self.tokens, other.tokens], dim=1)
        mask = torch.cat([self.mask, other.mask], dim=1)
        index = torch.cat([self.index, other.index], dim=1)
        order = sort_key(index, mask).argsort(dim=1)
        scores = None
        if self.scores is not None and other.scores is not None:
            scores = torch.cat([self.scores, other.scores], dim=1).gather(1, order)
        return PrunedTokens(
            tokens=tokens.gather(1, order.unsqueeze(-1).expand_as(tokens)),
            mask=mask.gather(1, order),
            index=index.gather(1, order),
            scores=scores,
        )


def sort_key(index: Tensor, mask: Tensor) -> Tensor:
    """Key that sorts real tokens by ``index`` and puts padding last. (B, N) long."""
    big = torch.iinfo(torch.long).max // 2
    return torch.where(mask, index, torch.full_like(index, big))


@dataclass
class TokenBatch:
    tokens: Tensor
    mask: Tensor
    index: Tensor
    modality: Tensor
    layout: Tensor
    scores: Tensor | None = None
    features: Tensor | None = None
    pruned: PrunedTokens | None = None
    losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, dict[str, float]] = field(default_factory=dict)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_tokens(
        cls,
        tokens: Tensor,
        mask: Tensor | None = None,
        modality: Modality | int | Tensor = Modality.IMAGE,
        layout: tuple[int, int, int] | Tensor | None = None,
    ) -> "TokenBatch":
        """Wrap ``tokens (B, N, D)``; default mask all-True, layout ``(1, 1, N)``.

        ``layout`` may be one ``(T, H, W)`` for every row or a ``(B, 3)`` tensor.
        """
        if tokens.dim() != 3:
            raise ValueError(f"tokens must be (B, N, D), got shape {tuple(tokens.shape)}")
        b, n, _ = tokens.shape
        dev = tokens.device
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=dev)
        if mask.shape != (b, n):
            raise ValueError(f"mask must be {(b, n)}, got {tuple(mask.shape)}")
        mask = mask.bool()
        index = torch.arange(n, device=dev).expand(b, n).clone()
        if isinstance(modality, Tensor):
            mod = modality.to(device=dev, dtype=torch.long).reshape(b)
        else:
            mod = torch.full((b,), int(modality), dtype=torch.long, device=dev)
        if layout is None:
            lay = torch.stack([torch.ones_like(mask.sum(1)), torch.ones_like(mask.sum(1)), mask.sum(1)], 1)
        elif isinstance(layout, Tensor):
            lay = layout.to(device=dev, dtype=torch.long).reshape(b, 3)
        else:
            lay = torch.tensor(layout, dtype=torch.long, device=dev).expand(b, 3).clone()
        if torch.any(lay.prod(1) != mask.sum(1)):
            raise ValueError(
                f"layout (T, H, W) products {lay.prod(1).tolist()} do not match the "
                f"number of real tokens per row {mask.sum(1).tolist()}"
            )
        return cls(tokens=tokens, mask=mask, index=index, modality=mod, layout=lay)

    # ------------------------------------------------------------------ helpers
    @property
    def lengths(self) -> Tensor:
        """Real tokens per row, (B,) long."""
        return self.mask.sum(1)

    def replace(self, **changes) -> "TokenBatch":
        """A shallow copy with fields replaced; dicts are copied so stages never alias them."""
        out = dataclasses.replace(self, **changes)
        if "losses" not in changes:
            out.losses = dict(self.losses)
        if "stats" not in changes:
            out.stats = dict(self.stats)
        return out
