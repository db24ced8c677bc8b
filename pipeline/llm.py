"""The contract of stages that act INSIDE the decoder LLM (torch only; no transformers here).

Two kinds, both registered with ``@register`` like every stage and configured under a pipeline's
``llm:`` list (the pre-LLM stages stay under ``stages:``)::

    stages: [{name: sam}, {name: fgcs, retention_ratio: 0.5}]
    llm:
      - {name: fastv, layer: 2, drop_ratio: 0.5}          # a LayerStage: prefill, between layers 1 and 2
      - {name: tova, cache_max_size: 512}                 # a CachePolicy: every layer's KV cache

:class:`LayerStage` -- prefill only. ``layer: K`` means it runs after decoder layer ``K - 1`` (0-based),
so layers ``0..K-1`` see every token and layers ``K..`` see what it returns. It gets a
:class:`LayerState` (hidden states, validity mask, RoPE positions, original indices, token kinds) and an
``attention`` callable (the probe of layer ``K - 1``, see below) and returns a state with at most as many
tokens. The runtime (``llava_deft.model.llm``) rebuilds masks and rotary embeddings for the layers after
it, and those layers cache only the tokens it kept.

:class:`CachePolicy` -- the KV cache of the layers it covers (``layers: null`` = all). After a layer ran
(prefill, and every decoding step) the runtime hands it a :class:`CacheView` of that layer: keys and
values per KV HEAD ``(B, H_kv, T, d)`` (never after ``repeat_kv``), their validity and the RoPE
positions they were cached at, and the attention the current queries pay them per query head. The
policy returns an importance ``(B, H_kv, T)``; the runtime keeps the ``budget`` most important slots of
every (row, KV head) and physically drops the rest (the cache shrinks; memory is freed). Keys keep the
rotary phase they were cached with, so positions never move.

``attention(queries)`` -- the probe. ``queries`` is how many of each row's LAST real tokens ask (1 = the
last token; under right padding too), ``"text"`` (every real text token) or a ``(B, L)`` bool mask of the
asking positions. It returns softmax attention probabilities ``(B, H, Q, T)`` in float32 computed from
the layer's own q/k projections, q/k norms and RoPE, with the layer's causal and padding mask; Q is the
most asking positions of a row, in column order and right-aligned: a row with fewer has all-zero rows
first. Attention itself stays SDPA/flash: only these scores are computed on the side.

Budgets: a policy keeps ``budget(T)`` slots per (row, KV head); when fewer valid tokens exist the spare
slots stay invalid (masked), so ragged rows are padding + mask, never a Python loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "AttentionProbe",
    "CachePolicy",
    "CacheView",
    "LayerStage",
    "LayerState",
    "TEXT_KIND",
    "collect_losses",
    "compact_rows",
    "group_heads",
    "kept_columns",
    "keep_topk",
]

TEXT_KIND = -1
"""``LayerState.kind`` of prompt text; media tokens carry their ``pipeline.Modality`` code (>= 0)."""

AttentionProbe = Callable[["int | str | Tensor"], Tensor]
"""``attention(queries) -> (B, H, Q, T)`` float32 probabilities (see the module docstring)."""


@dataclass
class LayerState:
    """What flows between decoder layers in prefill. All ``(B, L)`` except ``hidden``.

    hidden (B, L, D); mask bool, True for a real token (prompts are LEFT-padded: the last column is
    every row's last token); positions long, RoPE positions (may have gaps); index long, each token's
    column in the prompt as the LLM received it (ascending along L for real tokens); kind long,
    ``TEXT_KIND`` for prompt text, else the medium's ``Modality`` code; size float or None (= all ones),
    how many prompt tokens each token stands for after a merging stage (``recursive_compression_llm``):
    the layers after it add ``log(size)`` to the attention logits of that key (ToMe's proportional
    attention), in prefill and while decoding.
    """

    hidden: Tensor
    mask: Tensor
    positions: Tensor
    index: Tensor
    kind: Tensor
    size: Tensor | None = None

    @property
    def media(self) -> Tensor:
        """(B, L) bool: real media tokens."""
        return self.mask & (self.kind != TEXT_KIND)

    def take(self, keep: Tensor) -> "LayerState":
        """Keep the tokens where ``keep`` (B, L) is True, in order, right-aligned (left padding)."""
        return compact_rows(self, keep)


def compact_rows(state: LayerState, keep: Tensor) -> LayerState:
    """Gather the kept tokens of every row, in their order, into the rightmost columns.

    ``keep`` (B, L) bool (padding is never kept). The result has ``L' = max kept per row`` columns; rows
    with fewer kept tokens are left-padded (mask False, position 0, index -1, kind ``TEXT_KIND``), so
    the last column stays every row's last token. No loop over rows.
    """
    keep = keep & state.mask
    if bool((keep == state.mask).all()):  # keeps everything: the very same state
        return state
    b, l = keep.shape
    counts = keep.sum(1)  # (B,)
    width = int(counts.max()) if b else 0
    # stable order: kept tokens by column, placed so that row b's kept tokens end at column width-1
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]  # (B, L') kept columns first
    slot = torch.arange(width, device=keep.device).expand(b, width)
    shift = (width - counts).unsqueeze(1)  # (B, 1) left padding of each row
    valid = slot >= shift
    src = torch.gather(order, 1, (slot - shift).clamp(min=0))  # (B, L') source column of each output slot

    def take(x: Tensor, fill) -> Tensor:
        if x.dim() == 3:
            out = torch.gather(x, 1, src.unsqueeze(-1).expand(b, width, x.shape[-1]))
            return out * valid.unsqueeze(-1).to(out.dtype)
        return torch.where(valid, torch.gather(x, 1, src), torch.full_like(src, fill, dtype=x.dtype))

    return LayerState(
        hidden=take(state.hidden, 0), mask=valid, positions=take(state.positions, 0),
        index=take(state.index, -1), kind=take(state.kind, TEXT_KIND),
        size=None if state.size is None else take(state.size, 1),
    )


def kept_columns(keep: Tensor, width: int) -> Tensor:
    """Where :func:`compact_rows` puts each kept column: ``keep`` (B, L) bool (padding already False) ->
    (B, L) long, the output column of every kept input column (row ``b``'s kept tokens end at column
    ``width - 1``, in order), -1 elsewhere. A stage's ``last_assignment`` when it only drops tokens."""
    counts = keep.sum(1, keepdim=True)  # (B, 1)
    col = (width - counts) + keep.long().cumsum(1) - 1  # (B, L) rank among the kept, right-aligned
    return torch.where(keep, col, torch.full_like(col, -1))


@dataclass
class CacheView:
    """One layer's cache as a policy sees it (B rows, H_kv KV heads, T slots, G query heads per KV head).

    keys, values (B, H_kv, T, d); valid (B, H_kv, T) bool; positions (B, H_kv, T) long (RoPE positions
    the keys were cached at); kind (B, H_kv, T) long; attn (B, H_kv * G, Q, T) float32 probabilities of
    the current queries (prefill: the last ``Q`` prompt positions; decoding: the new token); ``extras``
    per-slot tensors (B, H_kv, T) a policy keeps with the cache (e.g. H2O's accumulated attention),
    gathered with every eviction; ``phase`` "prefill" or "decode"; ``layer`` the layer index.
    """

    keys: Tensor
    values: Tensor
    valid: Tensor
    positions: Tensor
    kind: Tensor
    attn: Tensor
    layer: int
    phase: Literal["prefill", "decode"]
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def groups(self) -> int:
        return self.attn.shape[1] // self.keys.shape[1]


def group_heads(attn: Tensor, num_kv_heads: int) -> Tensor:
    """(B, H, Q, T) -> (B, H_kv, G, Q, T): query heads grouped by the KV head they read (GQA order:
    query head ``h`` reads KV head ``h // G``, as transformers' ``repeat_kv``)."""
    b, h, q, t = attn.shape
    if h % num_kv_heads:
        raise ValueError(f"{h} query heads do not split into {num_kv_heads} KV heads")
    return attn.view(b, num_kv_heads, h // num_kv_heads, q, t)


def keep_topk(scores: Tensor, valid: Tensor, budget: int) -> Tensor:
    """Slots to keep: the ``budget`` highest ``scores`` among ``valid`` ones per leading index, ascending.

    scores, valid (..., T); returns (..., min(budget, T)) long. Invalid slots rank below every valid one
    (they are kept only when a row has fewer than ``budget`` valid slots, and stay invalid); ties go to
    the earlier slot, so the choice is deterministic.
    """
    t = scores.shape[-1]
    k = min(int(budget), t)
    ranked = torch.where(valid, scores.float(), torch.full_like(scores, -math.inf, dtype=torch.float32))
    # stable descending sort: ties (invalid -inf ones included) go to the earlier slot
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :k]
    return order.sort(dim=-1).values


def collect_losses(stages) -> dict[str, Tensor]:
    """The auxiliary losses LLM stages computed in their last prefill (``stage.aux_losses``, e.g.
    ``recursive_compression_llm``'s contrastive loss), taken: each stage's dict is emptied, so a loss is
    added to one step's loss once. The model's forward adds them to the LM loss."""
    out: dict[str, Tensor] = {}
    for stage in stages:
        losses = getattr(stage, "aux_losses", None)
        if losses:
            out.update(losses)
            stage.aux_losses = {}
    return out


class _LLMStageBase(nn.Module):
    placement = "llm"

    def bind(self, num_layers: int, num_heads: int, num_kv_heads: int) -> None:
        """Called once when installed on a model: check the options against its shape, size state."""
        self.num_layers, self.num_heads, self.num_kv_heads = num_layers, num_heads, num_kv_heads


class LayerStage(_LLMStageBase):
    """A prefill stage between layers ``layer - 1`` and ``layer``; subclasses implement :meth:`reduce`.

    ``queries`` (class or instance attribute) says which queries :meth:`reduce`'s ``attention`` probe
    needs: an int (that many last positions) or ``"text"`` (every real text position of the prompt).

    Tracing (optional; for viewers such as ``llava-deft viewer``). When the runtime records a prefill
    (``LLMStages(..., record=True)``) it sets ``record_assignment = True`` on the stage for that call and
    ``last_assignment = None`` before it. A stage that MERGES tokens should then set
    ``self.last_assignment``: a (B, L_in) long tensor, for every input column the output column it went
    into (several input columns share one output column when they were merged into it; -1 = dropped, and
    on padding). Without it the runtime derives each token's fate from the output state's ``index``
    (present = kept, absent = dropped), which is exact for stages that only drop. When
    ``record_assignment`` is False (always, outside a recording) a stage computes nothing for it.
    """

    kind_of_stage = "layer"
    queries: "int | str" = 1
    record_assignment = False  # set True by the runtime only while it records a trace (see above)
    last_assignment: Tensor | None = None

    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer

    def bind(self, num_layers: int, num_heads: int, num_kv_heads: int) -> None:
        if not 1 <= self.layer < num_layers:
            raise ValueError(
                f"{self.stage_name}.layer={self.layer}: it runs between layers layer-1 and layer, so it must be in "
                f"1..{num_layers - 1} for this {num_layers}-layer LLM"
            )
        super().bind(num_layers, num_heads, num_kv_heads)

    def forward(self, state: LayerState, attention: AttentionProbe) -> LayerState:
        out = self.reduce(state, attention)
        if out.hidden.shape[1] > state.hidden.shape[1]:
            raise RuntimeError(f"LLM stage {self.stage_name!r} returned more tokens than it got")
        return out

    def reduce(self, state: LayerState, attention: AttentionProbe) -> LayerState:
        """The stage itself (abstract): a subclass returns the state of the tokens that go on."""
        raise NotImplementedError(f"{type(self).__name__} is a LayerStage and must implement reduce(state, attention)")


class CachePolicy(_LLMStageBase):
    """A KV-cache policy; subclasses implement :meth:`score` (higher = keep).

    Options every policy has: ``cache_max_size`` (slots per row and KV head per layer) and ``layers``
    (the layer indices it covers; None = all). Class attributes: ``evict_in_prefill`` /
    ``evict_in_decoding`` (when it acts) and ``window`` (how many last prompt positions query the cache
    at prefill; ``"all"`` = every prompt position, in chunks, as H2O's accumulated attention needs).
    :meth:`observe` is called after every eviction with the slots kept (for stateful policies).
    State a policy keeps per slot goes in ``view.extras`` (updated in place where possible); the
    runtime gathers it with every eviction and appends zeros for new slots.
    """

    kind_of_stage = "cache"
    evict_in_prefill = True
    evict_in_decoding = True
    window: "int | str" = 1
    graph_safe = False  # True: update/score/observe never read tensors on the host and keep state in place,
    # so the runtime may capture a steady decoding step in a CUDA graph and replay it

    def __init__(self, cache_max_size: int, layers: list[int] | None = None):
        super().__init__()
        self.cache_max_size = cache_max_size
        self.layers = None if layers is None else sorted(set(layers))
        self.stats: dict[int, dict[str, float]] = {}

    def bind(self, num_layers: int, num_heads: int, num_kv_heads: int) -> None:
        bad = [i for i in (self.layers or []) if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"{self.stage_name}.layers has {bad}; this LLM has layers 0..{num_layers - 1}")
        super().bind(num_layers, num_heads, num_kv_heads)

    def covers(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def budget(self, view: CacheView) -> int:
        return self.cache_max_size

    def acts(self, phase: str) -> bool:
        return self.evict_in_prefill if phase == "prefill" else self.evict_in_decoding

    def update(self, view: CacheView) -> None:
        """Called with every view before :meth:`score` (also when nothing is evicted): accumulate state."""

    def score(self, view: CacheView) -> Tensor:
        """The policy itself (abstract): a subclass returns the (B, H_kv, T) importance of the slots."""
        raise NotImplementedError(f"{type(self).__name__} is a CachePolicy and must implement score(view)")

    def observe(self, view: CacheView, keep: Tensor) -> None:
        """Called after the runtime chose ``keep`` (B, H_kv, K) slots of ``view``."""

    def reset(self) -> None:
        """Forget per-call state (called at the start of every prefill)."""
        self.stats = {}
