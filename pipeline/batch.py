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
    encoder_attention (B, N) float  attention each token received in the vision encoder (from the CLS
                                token of the feature layer, or the mean over all queries without one),
                                set by the image tower when a stage asks for it (``visionzip``);
                                None otherwise. Follows the kept tokens like ``scores``.
    sizes     (B, N)     float  optional: how many input tokens each token stands for, set by a stage that
                                merges and asks the LLM for proportional attention (``recursive_compression``
                                with ``proportional_attention``); None = every token is itself (size 1).
                                Follows the kept tokens; a later merge adds the sizes it merges; tokens
                                that RTD recovers come back with size 1. The LLM adds ``log(size)`` to the
                                attention logits of each key (ToMe's proportional attention).
    query     (B, Q, D)  float  optional: the embeddings of the text that asks about each row (the
                                row's own sample's PROMPT tokens, at the LLM's input-embedding width,
                                D) for stages that score tokens by their relevance to it (``fgcs`` with
                                ``query_weight > 0``); None otherwise. Set with the tokens
                                (``from_tokens(query=...)``; ``LlavaDeftForCausalLM`` attaches it when a
                                stage declares ``needs_query``) and never changed by a stage: stages
                                keep every row, in order, so it rides along.
    query_mask (B, Q)    bool   True for a real query token (a row may have none: the query term is
                                then 0 for it); set exactly when ``query`` is.

Row operations on fresh batches (before any stage ran), for callers that gather media of
several kinds into one pipeline call: ``TokenBatch.cat_rows(parts)``, ``batch.take_rows(order)``
and ``TokenBatch.empty(dim)``.
"""

from __future__ import annotations

import dataclasses
import math
import enum
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
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


def _check_query(query: Tensor | None, query_mask: Tensor | None, b: int, d: int) -> tuple[Tensor | None, Tensor | None]:
    """``(query, query_mask)`` checked against ``B`` rows of width ``D``: ``query (B, Q, D)`` float,
    ``query_mask (B, Q)`` (default all-True); a mask without a query raises ``ValueError``."""
    if query is None:
        if query_mask is not None:
            raise ValueError("query_mask was given without a query; pass query=(B, Q, D) embeddings too")
        return None, None
    if query.dim() != 3 or query.shape[0] != b or query.shape[2] != d:
        raise ValueError(
            f"query must be (B, Q, D) = ({b}, Q, {d}) (one row of prompt embeddings per token row, at the "
            f"tokens' width), got shape {tuple(query.shape)}"
        )
    if not query.is_floating_point():
        raise ValueError(f"query must be a float tensor of embeddings, got {query.dtype}")
    if query_mask is None:
        query_mask = torch.ones(query.shape[:2], dtype=torch.bool, device=query.device)
    if query_mask.shape != query.shape[:2]:
        raise ValueError(f"query_mask must be {tuple(query.shape[:2])} (B, Q), got {tuple(query_mask.shape)}")
    return query, query_mask.bool()


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
    encoder_attention: Tensor | None = None
    query: Tensor | None = None
    query_mask: Tensor | None = None
    sizes: Tensor | None = None
    losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    kinds: frozenset[int] | None = None
    """The :class:`Modality` codes the rows may hold, known on the host without reading ``modality``
    (set by :meth:`from_tokens` from a plain modality, :meth:`empty` and :meth:`cat_rows`); None: unknown.
    Lets a stage skip work for a modality no row has (fgcs's text neighbours) without a device read."""

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_tokens(
        cls,
        tokens: Tensor,
        mask: Tensor | None = None,
        modality: Modality | int | Tensor = Modality.IMAGE,
        layout: tuple[int, int, int] | Tensor | None = None,
        encoder_attention: Tensor | None = None,
        query: Tensor | None = None,
        query_mask: Tensor | None = None,
    ) -> "TokenBatch":
        """Wrap ``tokens (B, N, D)``; default mask all-True, layout ``(1, 1, N)``.

        ``layout`` may be one ``(T, H, W)`` for every row or a ``(B, 3)`` tensor;
        ``encoder_attention`` an optional ``(B, N)`` float; ``query`` an optional ``(B, Q, D)`` float
        with ``query_mask (B, Q)`` bool (default all-True; see the module docstring).
        """
        if tokens.dim() != 3:
            raise ValueError(f"tokens must be (B, N, D), got shape {tuple(tokens.shape)}")
        b, n, _ = tokens.shape
        dev = tokens.device
        all_real = mask is None
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=dev)
        if mask.shape != (b, n):
            raise ValueError(f"mask must be {(b, n)}, got {tuple(mask.shape)}")
        mask = mask.bool()
        if encoder_attention is not None and encoder_attention.shape != (b, n):
            raise ValueError(f"encoder_attention must be {(b, n)}, got {tuple(encoder_attention.shape)}")
        query, query_mask = _check_query(query, query_mask, b, tokens.shape[2])
        index = torch.arange(n, device=dev).expand(b, n).clone()
        if isinstance(modality, Tensor):
            mod = modality.to(device=dev, dtype=torch.long).reshape(b)
        else:
            mod = torch.full((b,), int(modality), dtype=torch.long, device=dev)
        if layout is None:
            lay = torch.stack([torch.ones_like(mask.sum(1)), torch.ones_like(mask.sum(1)), mask.sum(1)], 1)
        elif isinstance(layout, Tensor):
            lay = layout.to(device=dev, dtype=torch.long).reshape(b, 3)
        else:  # filled on the device: no host-to-device copy (it would wait for the queued kernels)
            lay = torch.stack([torch.full((b,), int(v), dtype=torch.long, device=dev) for v in layout], 1)
        if all_real and not isinstance(layout, Tensor) and layout is not None:  # checked on the host
            if math.prod(layout) != n:
                raise ValueError(f"layout (T, H, W) products {[math.prod(layout)] * b} do not match the "
                                 f"number of real tokens per row {[n] * b}")
        elif torch.any(lay.prod(1) != mask.sum(1)):
            raise ValueError(
                f"layout (T, H, W) products {lay.prod(1).tolist()} do not match the "
                f"number of real tokens per row {mask.sum(1).tolist()}"
            )
        return cls(tokens=tokens, mask=mask, index=index, modality=mod, layout=lay, encoder_attention=encoder_attention,
                   query=query, query_mask=query_mask,
                   kinds=None if isinstance(modality, Tensor) else frozenset({int(modality)}))

    @classmethod
    def empty(cls, dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> "TokenBatch":
        """A batch of no rows: tokens ``(0, 1, dim)`` of ``dtype``; mask ``(0, 1)`` bool; index ``(0, 1)``,
        modality ``(0,)`` and layout ``(0, 3)`` long. Lets a caller with no media keep one code path."""
        return cls(
            tokens=torch.zeros(0, 1, dim, dtype=dtype, device=device),
            mask=torch.zeros(0, 1, dtype=torch.bool, device=device),
            index=torch.zeros(0, 1, dtype=torch.long, device=device),
            modality=torch.zeros(0, dtype=torch.long, device=device),
            layout=torch.zeros(0, 3, dtype=torch.long, device=device),
            kinds=frozenset(),
        )

    @classmethod
    def cat_rows(cls, parts: list["TokenBatch"]) -> "TokenBatch":
        """Stack fresh batches row-wise: ``(B_i, N_i, D)`` -> ``(sum B_i, max N_i, D)``.

        Shorter parts are padded at the end with zero tokens and mask False; ``index`` is each
        part's, its padded columns continuing every row's last index by 1 (fresh batches index their
        tokens ``0..N-1``, so theirs stays ``0..N-1``; rows of a bounded stream memory,
        ``llava_deft.encoders.stream``, keep their kept positions); tokens take the
        first part's dtype (e.g. text rows from the LLM's embeddings, media rows from a
        projector). ``modality`` and ``layout`` are concatenated. ``encoder_attention`` is kept
        when any part has it; parts without it (text, audio) get zeros there. ``query`` likewise: padded
        to the longest ``Q`` (``query_mask`` False there), parts without one get an all-False mask.
        Every part must be fresh (no stage has run on it, see :meth:`take_rows`), else ``ValueError``.
        """
        if not parts:
            raise ValueError("TokenBatch.cat_rows needs at least one batch")
        for i, p in enumerate(parts):
            p._require_fresh(f"TokenBatch.cat_rows (parts[{i}])")
        n = max(p.tokens.shape[1] for p in parts)

        def pad(x: Tensor, value) -> Tensor:  # (b, N_i, ...) -> (b, n, ...) at the end of dim 1
            return F.pad(x, (0, 0, 0, n - x.shape[1]) if x.dim() == 3 else (0, n - x.shape[1]), value=value)

        def pad_index(x: Tensor) -> Tensor:  # (b, N_i) -> (b, n): padded columns continue each row's last index
            if x.shape[1] == n:
                return x
            last = x[:, -1:] if x.shape[1] else x.new_full((x.shape[0], 1), -1)
            return torch.cat([x, last + torch.arange(1, n - x.shape[1] + 1, device=x.device)], dim=1)

        dtype = parts[0].tokens.dtype
        attention = None
        if any(p.encoder_attention is not None for p in parts):
            attention = torch.cat([
                pad(p.encoder_attention.float() if p.encoder_attention is not None
                    else torch.zeros(p.mask.shape, device=p.mask.device), 0.0)
                for p in parts
            ])  # (B, N)
        query = query_mask = None
        if any(p.query is not None for p in parts):
            first = next(p.query for p in parts if p.query is not None)
            q = max(p.query.shape[1] for p in parts if p.query is not None)
            query = torch.cat([
                F.pad(p.query.to(first.dtype), (0, 0, 0, q - p.query.shape[1])) if p.query is not None
                else first.new_zeros(p.tokens.shape[0], q, first.shape[2])
                for p in parts
            ])  # (B, Q, D)
            query_mask = torch.cat([
                F.pad(p.query_mask, (0, q - p.query_mask.shape[1]), value=False) if p.query is not None
                else torch.zeros(p.tokens.shape[0], q, dtype=torch.bool, device=first.device)
                for p in parts
            ])  # (B, Q)
        return cls(
            tokens=torch.cat([pad(p.tokens.to(dtype), 0.0) for p in parts]),  # (B, N, D)
            mask=torch.cat([pad(p.mask, False) for p in parts]),  # (B, N)
            index=torch.cat([pad_index(p.index) for p in parts]),  # (B, N)
            modality=torch.cat([p.modality for p in parts]),  # (B,)
            layout=torch.cat([p.layout for p in parts]),  # (B, 3)
            encoder_attention=attention,
            query=query,
            query_mask=query_mask,
            kinds=None if any(p.kinds is None for p in parts) else frozenset().union(*(p.kinds for p in parts)),
        )

    # ------------------------------------------------------------------ helpers
    @property
    def lengths(self) -> Tensor:
        """Real tokens per row, (B,) long."""
        return self.mask.sum(1)

    def take_rows(self, order: Tensor) -> "TokenBatch":
        """Rows ``order`` (``(B',)`` long indices or a ``(B,)`` bool mask) of a fresh batch.

        ``encoder_attention`` and ``query`` / ``query_mask`` (inputs, set with the tokens) follow the rows.
        Only fresh batches (straight from :meth:`from_tokens`, :meth:`cat_rows` or
        :meth:`empty`) are taken apart: ``scores``, ``features``, ``pruned``, ``losses`` and
        ``stats`` describe what stages did, and losses and stats are batch-wide sums that do not
        split by row, so a batch with any of them set raises ``ValueError`` instead of dropping them.
        """
        self._require_fresh("TokenBatch.take_rows")
        return TokenBatch(
            tokens=self.tokens[order], mask=self.mask[order], index=self.index[order],
            modality=self.modality[order], layout=self.layout[order],
            encoder_attention=None if self.encoder_attention is None else self.encoder_attention[order],
            query=None if self.query is None else self.query[order],
            query_mask=None if self.query_mask is None else self.query_mask[order],
            kinds=self.kinds,  # the rows taken hold a subset
        )

    def with_query(self, query: Tensor | None, query_mask: Tensor | None = None) -> "TokenBatch":
        """This batch with ``query (B, Q, D)`` / ``query_mask (B, Q)`` set (checked as in
        :meth:`from_tokens`; ``None`` clears them). Stages never change the query, so it may be set on
        any batch."""
        query, query_mask = _check_query(query, query_mask, self.tokens.shape[0], self.tokens.shape[2])
        return self.replace(query=query, query_mask=query_mask)

    def _require_fresh(self, what: str) -> None:
        set_fields = [k for k in ("scores", "features", "pruned", "sizes") if getattr(self, k) is not None]
        set_fields += [k for k in ("losses", "stats") if getattr(self, k)]
        if set_fields:
            raise ValueError(
                f"{what} takes fresh batches (before any stage ran), but this one has {set_fields} set; "
                "those would be dropped. Combine or reorder rows before the pipeline runs"
            )

    def replace(self, **changes) -> "TokenBatch":
        """A shallow copy with fields replaced; dicts are copied so stages never alias them."""
        out = dataclasses.replace(self, **changes)
        if "losses" not in changes:
            out.losses = dict(self.losses)
        if "stats" not in changes:
            out.stats = dict(self.stats)
        return out
