"""Recursive compression by clustering (issue 18; seeds 001 and 003), before and inside the LLM.

Three registered stages around one :class:`~pipeline.recursive.RecursiveCompressionLayer` (the method, its
math and its guarantees are in :mod:`pipeline.recursive`'s docstring):

- ``recursive_compression`` (before the LLM, on a TokenBatch of any modality, text rows included): each
  row's consecutive tokens whose similarity to their cluster's anchor is at least the (adaptive)
  threshold merge into their size-weighted mean, kept at the anchor's (first member's) ``index``. The
  number kept depends on the data: the output is as wide as the input (no host read), real tokens first;
  merged-away tokens go to ``pruned`` with their own values. Similarity: the tokens' (no attention before
  the LLM). ``batch.losses["recursive_compression_contrastive"]`` in training. ``proportional_attention``
  (default on): the output's ``TokenBatch.sizes`` say how many input tokens each cluster stands for, and
  the LLM adds ``log(size)`` to the attention logits of each merged key in every layer and while decoding
  (ToMe's proportional attention): a cluster of s identical tokens then draws the attention the s tokens
  drew. Off: a cluster weighs as one token.
- ``recursive_compression_llm`` (a layer stage, after decoder layer ``layer - 1``): the same on the
  hidden states of MEDIA tokens (text is never merged; a cluster never spans two media items or a text
  token), similarity mixed with the tokens' attention profiles from the probe of the last ``num_queries``
  positions (``attention_weight``). ``LayerState.size`` carries every cluster's size, so the layers after
  weight a merged key by ``log(size)`` (ToMe's proportional attention; the runtime adds it to the masks,
  in prefill and while decoding) and a second compression stage at a later layer merges sizes exactly:
  the compression is recursive. A cluster takes its anchor's RoPE position, index and kind.
  ``tokens: all`` (a text LM: seeds 001/003) merges text tokens too, and a cluster then sits at its LAST
  member's column (:func:`at_last_member`), so its output, and the logits there, see no later token;
  the columns before it in its run predict nothing and the LM loss skips them (``LLMStages.present``).
  Which tokens merge is still decided from the whole row (the adaptive threshold's statistics and
  modulator context, and the attention profiles from the last positions): in an LM's training loss that
  is a weak channel from later tokens into earlier merges; ``adaptive_threshold: false`` with
  ``attention_weight: 0`` decides every merge from the cluster's own tokens alone.
  ``aux_losses["recursive_compression_llm@<layer>.contrastive"]`` in training
  (:func:`pipeline.llm.collect_losses`).
- ``progressive_compression``: ``recursive_compression_llm`` whose floor is set by its depth
  (:func:`~pipeline.recursive.depth_threshold`: ``layer / num_layers < 0.3`` -> ``conservative``,
  ``< 0.7`` -> ``moderate``, else ``aggressive``). Put one at several layers to compress more the deeper
  the model goes.

Every stage records ``last_stats`` (0-dim tensors: ``tokens_in`` / ``tokens_out`` mergeable tokens per row,
``compression_ratio``, ``threshold``, ``mean_cluster_size``; :func:`pipeline.recursive.compression_stats`
reads them) and ``last_assignment`` (B, L_in) long: the output column of each input token's cluster, -1
for padding (a merge shares a column), always before the LLM, inside it while the runtime records a
trace (``record_assignment``). ``threshold_raise`` is the :class:`~pipeline.recursive.EmergencyParachute`'s.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..batch import TokenBatch
from ..llm import AttentionProbe, LayerStage, LayerState, compact_rows
from ..ops import split_by_mask
from ..recursive import Compression, RecursiveCompressionLayer, cluster_means, depth_threshold, output_columns
from ..registry import register
from ..types import NonNegFloat, PosInt

Threshold = Annotated[float, Field(ge=-1, le=2)]  # a cosine similarity; > 1 merges nothing
Share = Annotated[float, Field(ge=0, le=1)]


class _ThresholdAccess:
    """``similarity_threshold`` / ``threshold_raise`` of the stage's ``core`` (the parachute sets them)."""

    core: RecursiveCompressionLayer

    @property
    def similarity_threshold(self) -> float:
        return self.core.similarity_threshold

    @property
    def threshold_raise(self) -> float:
        return self.core.threshold_raise

    @threshold_raise.setter
    def threshold_raise(self, value: float) -> None:
        self.core.threshold_raise = float(value)


@register("recursive_compression")
class RecursiveCompression(_ThresholdAccess, nn.Module):
    selects_tokens = False  # outputs are cluster means
    variable_count = True  # how many tokens a row keeps depends on the data (1..n), see pipeline/registry.py

    def __init__(self, dim: int, similarity_threshold: Threshold = 0.85, adaptive_threshold: bool = True,
                 threshold_std: NonNegFloat = 1.0, max_offset: NonNegFloat = 0.1, modulator_dim: PosInt = 64,
                 use_residuals: bool = True, contrastive_margin: NonNegFloat = 0.2,
                 contrastive_weight: NonNegFloat = 0.1, projection_dim: PosInt = 128,
                 max_cluster_size: PosInt | None = None, proportional_attention: bool = True,
                 within_frames: bool = False):
        super().__init__()
        self.proportional_attention = proportional_attention
        self.within_frames = within_frames
        self.core = RecursiveCompressionLayer(
            dim, similarity_threshold=similarity_threshold, attention_weight=0.0, adaptive_threshold=adaptive_threshold,
            use_residuals=use_residuals, contrastive_margin=contrastive_margin, contrastive_weight=contrastive_weight,
            threshold_std=threshold_std, max_offset=max_offset, modulator_dim=modulator_dim,
            projection_dim=projection_dim, max_cluster_size=max_cluster_size)
        self.last_stats: dict[str, Tensor] = {}
        self.last_assignment: Tensor | None = None

    def forward(self, batch: TokenBatch) -> TokenBatch:
        frame = None
        if self.within_frames:  # a cluster never spans two frames: each frame keeps a token at its own positions
            frame = batch.index // batch.layout[:, 1:].prod(1, keepdim=True).clamp(min=1)
        comp = self.core.compress(batch.tokens, batch.mask, size=batch.sizes, kind=frame)  # earlier merges: by size
        owner = comp.owner.clamp(min=0)
        weight = (comp.size.new_ones(comp.size.shape) if batch.sizes is None else batch.sizes.to(comp.size.dtype)) \
            * batch.mask.to(comp.size.dtype)

        def averaged(x: Tensor | None) -> Tensor | None:  # features / scores follow the clusters
            if x is None:
                return None
            flat = x.unsqueeze(-1) if x.dim() == 2 else x
            mean, _ = cluster_means(flat.to(comp.size.dtype), owner, weight)
            mean = torch.where(comp.keep.unsqueeze(-1), mean, flat.to(mean.dtype)).to(x.dtype)
            return mean.squeeze(-1) if x.dim() == 2 else mean

        n = batch.mask.shape[1]
        # each kept cluster stands for its members' sizes (comp.size; merged-away tokens leave with the split)
        sizes = comp.size if self.proportional_attention or batch.sizes is not None else None
        merged = batch.replace(tokens=comp.merged, features=averaged(batch.features), scores=averaged(batch.scores),
                               sizes=sizes)
        out = split_by_mask(merged, comp.keep, self.stage_name, width=n, drop_width=n)  # widths from shapes
        stats = comp.stats(batch.mask)
        out.stats[self.stage_name].update({k: stats[k] for k in ("compression_ratio", "threshold", "mean_cluster_size")})
        self.last_stats = dict(out.stats[self.stage_name])
        self.last_assignment = output_columns(comp.owner, comp.keep, n, right_aligned=False)
        if comp.loss is not None:
            out.losses[f"{self.stage_name}_contrastive"] = comp.loss
        return out

    def extra_repr(self) -> str:
        c = self.core
        return (f"similarity_threshold={c.similarity_threshold}, adaptive_threshold={c.adaptive_threshold}, "
                f"use_residuals={c.use_residuals}, contrastive_weight={c.contrastive_weight}, "
                f"max_cluster_size={c.max_cluster_size}")


def _reduce(stage, state: LayerState, attention: AttentionProbe) -> LayerState:
    """Cluster and merge the media tokens of ``state`` with ``stage.core`` (both LLM stages)."""
    core: RecursiveCompressionLayer = stage.core
    media = state.media if stage.tokens == "media" else state.mask
    attn = attention(stage.queries) if core.attention_weight > 0 else None  # (B, H, Q, L)
    comp = core.compress(state.hidden, state.mask, eligible=media, size=state.size, kind=state.kind, attention=attn)
    if stage.tokens == "all":
        comp = at_last_member(comp, state.mask)
    key = f"{stage.stage_name}@{stage.layer}"
    stage.last_stats = comp.stats(media)
    stage.aux_losses = {} if comp.loss is None else {f"{key}.contrastive": comp.loss}
    if bool((comp.keep == state.mask).all()):  # nothing merged: the very same state (and model)
        if getattr(stage, "record_assignment", False):
            stage.last_assignment = output_columns(comp.owner, comp.keep, state.mask.shape[1], right_aligned=True)
        return state
    size = comp.size if state.size is None else comp.size.to(state.size.dtype)
    out = compact_rows(replace(state, hidden=comp.merged, size=size), comp.keep)
    if getattr(stage, "record_assignment", False):  # tracing only (pipeline.llm.LayerStage): a cluster's members share its column
        stage.last_assignment = output_columns(comp.owner, comp.keep, out.hidden.shape[1], right_aligned=True)
    return out


def at_last_member(comp: Compression, mask: Tensor) -> Compression:
    """The clusters of ``comp`` (contiguous runs, anchor = first member) moved to their LAST member's column:
    its hidden state, size and keep flag there, so the cluster takes that token's index, position and kind.
    Causal for a language model: a cluster's output then sees no token after the column it sits in, and
    its logits predict the token after the whole run (the columns before it in the run predict nothing;
    the model's loss skips them: ``LLMStages.present``)."""
    owner = comp.owner.clamp(min=0)  # (B, L) anchor column of each token
    following = torch.cat([comp.owner[:, 1:], torch.full_like(comp.owner[:, :1], -1)], 1)
    last = mask & (comp.owner >= 0) & (comp.owner != following)  # (B, L) each run's last column
    merged = comp.merged.gather(1, owner.unsqueeze(-1).expand_as(comp.merged))  # (B, L, D) the cluster's token
    size = torch.where(last, comp.size.gather(1, owner), comp.size)
    cols = torch.arange(owner.shape[1], device=owner.device).expand_as(owner)
    last_of = torch.zeros_like(owner).scatter_reduce(1, owner, torch.where(last, cols, 0), "amax")  # anchor -> last col
    new_owner = torch.where(comp.owner >= 0, last_of.gather(1, owner), comp.owner)
    return replace(comp, merged=torch.where(last.unsqueeze(-1), merged, comp.merged), keep=last, size=size,
                   owner=new_owner)


def _core(dim: int, similarity_threshold: float, **options) -> RecursiveCompressionLayer:
    return RecursiveCompressionLayer(dim, similarity_threshold=similarity_threshold, **options)


_CORE_OPTIONS = ("attention_weight", "adaptive_threshold", "threshold_std", "max_offset", "modulator_dim",
                 "use_residuals", "contrastive_margin", "contrastive_weight", "projection_dim", "max_cluster_size")


def _setup_llm_stage(stage: LayerStage, dim: int, floor: float, options: dict) -> None:
    """What both LLM stages hold: probe queries, the tokens they merge, the clustering core at ``floor``
    (its options taken from the constructor's arguments ``options``), empty stats and losses."""
    stage.queries, stage.tokens = options["num_queries"], options["tokens"]
    stage.core = _core(dim, floor, **{k: options[k] for k in _CORE_OPTIONS})
    stage.last_stats: dict[str, Tensor] = {}
    stage.aux_losses: dict[str, Tensor] = {}


@register("recursive_compression_llm")
class RecursiveCompressionLLM(_ThresholdAccess, LayerStage):
    def __init__(self, dim: int, layer: PosInt = 2, similarity_threshold: Threshold = 0.85,
                 attention_weight: Share = 0.3, num_queries: PosInt = 8, adaptive_threshold: bool = True,
                 threshold_std: NonNegFloat = 1.0, max_offset: NonNegFloat = 0.1, modulator_dim: PosInt = 64,
                 use_residuals: bool = True, contrastive_margin: NonNegFloat = 0.2,
                 contrastive_weight: NonNegFloat = 0.1, projection_dim: PosInt = 128,
                 max_cluster_size: PosInt | None = None, tokens: Literal["media", "all"] = "media"):
        super().__init__(layer)
        _setup_llm_stage(self, dim, similarity_threshold, locals())

    def reduce(self, state: LayerState, attention: AttentionProbe) -> LayerState:
        return _reduce(self, state, attention)

    def extra_repr(self) -> str:
        c = self.core
        return (f"layer={self.layer}, similarity_threshold={c.similarity_threshold}, "
                f"attention_weight={c.attention_weight}, num_queries={self.queries}, "
                f"adaptive_threshold={c.adaptive_threshold}, max_cluster_size={c.max_cluster_size}")


@register("progressive_compression")
class ProgressiveCompressionLayer(_ThresholdAccess, LayerStage):
    """``recursive_compression_llm`` whose floor follows its depth (set when installed on a model)."""

    def __init__(self, dim: int, layer: PosInt = 2, conservative: Threshold = 0.95, moderate: Threshold = 0.9,
                 aggressive: Threshold = 0.8, attention_weight: Share = 0.3, num_queries: PosInt = 8,
                 adaptive_threshold: bool = True, threshold_std: NonNegFloat = 1.0, max_offset: NonNegFloat = 0.1,
                 modulator_dim: PosInt = 64, use_residuals: bool = True, contrastive_margin: NonNegFloat = 0.2,
                 contrastive_weight: NonNegFloat = 0.1, projection_dim: PosInt = 128,
                 max_cluster_size: PosInt | None = None, tokens: Literal["media", "all"] = "media"):
        super().__init__(layer)
        self.thresholds = (conservative, moderate, aggressive)
        _setup_llm_stage(self, dim, conservative, locals())  # until bind() knows the depth: the conservative floor

    def bind(self, num_layers: int, num_heads: int, num_kv_heads: int) -> None:
        super().bind(num_layers, num_heads, num_kv_heads)
        self.core.similarity_threshold = depth_threshold(self.layer, num_layers, *self.thresholds)

    def reduce(self, state: LayerState, attention: AttentionProbe) -> LayerState:
        return _reduce(self, state, attention)

    def extra_repr(self) -> str:
        c, (cons, mod, agg) = self.core, self.thresholds
        return (f"layer={self.layer}, conservative={cons}, moderate={mod}, aggressive={agg}, "
                f"threshold={c.similarity_threshold}, attention_weight={c.attention_weight}")
