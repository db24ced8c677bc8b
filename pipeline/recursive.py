"""Recursive compression by clustering (issue 18; seeds 001 and 003): pure functions and the module.

Used by the stages ``recursive_compression`` (before the LLM, on a :class:`~pipeline.batch.TokenBatch`),
``recursive_compression_llm`` and ``progressive_compression`` (inside the LLM, on a
:class:`~pipeline.llm.LayerState`), all in :mod:`pipeline.stages.recursive`. Tests and the slow
references: ``tests/test_recursive_compression.py``.

**Similarity** (:func:`cosine_similarity_matrix`, :func:`attention_similarity`): the cosine similarity of
the tokens, mixed with the cosine similarity of their *attention profiles* when a probe is available
(in the LLM): ``(1 - attention_weight) * emb_sim + attention_weight * attn_sim``. A token's profile is
the attention it receives from the probe's queries, over every head and asking position, ``(H * Q,)``;
two tokens with the same profile are read alike by the model. Never eager attention (STYLE §11).

**Adaptive threshold** (:meth:`RecursiveCompressionLayer.compute_adaptive_threshold`), per batch row::

    stat   = mean + threshold_std * std        of the row's off-diagonal similarities of mergeable tokens
    offset = max_offset * tanh(MLP(context))   context: the mean of the row's mergeable tokens
    tau    = min(floor + softplus(beta * (stat + offset - floor)) / beta, max(floor, 1))   (beta = SHARPNESS)

``floor`` is ``similarity_threshold`` plus the parachute's ``threshold_raise`` (:class:`EmergencyParachute`).
The smooth maximum is never below the floor and stays differentiable in the modulator (a hard ``max``
would cut the gradient whenever the floor wins); the cap at 1 keeps near-identical tokens (whose
statistics exceed 1) mergeable.

**Anchor-chain clustering** (:func:`anchor_clusters`). Tokens are read in column order. The first token
is an anchor; a token joins the cluster of the current anchor ``a`` when it *links* to ``a``, else it
becomes the next anchor. Token ``j > a`` links to ``a`` when every token ``a..j`` is mergeable and of the
same kind (one run), ``sim[a, j] >= tau``, and (with ``max_cluster_size``) the sizes of ``a..j`` sum to at
most ``max_cluster_size``. Clusters are therefore contiguous runs, and **every member's similarity to its
cluster's anchor is at least tau >= floor** (connected components of a threshold graph would not promise
that). Tokens that may not merge (padding, and text inside the LLM) are anchors of their own. Vectorised
exactly: ``next[a]`` = the first ``j > a`` that does not link to ``a`` (one ``(B, L, L)`` comparison and an
argmax), and the anchors are the chain ``0, next[0], next[next[0]], ...``, found by pointer doubling in
``ceil(log2(L + 1))`` rounds (the only Python loop; no loop over rows or tokens).

**Merging** (:func:`cluster_means`): a cluster becomes the size-weighted mean of its members (every input
token has size 1 before the LLM; inside the LLM ``LayerState.size`` carries the sizes of earlier merges,
so compressing compressed tokens is exact: recursive). Its size is the sum of its members'. Its RoPE
position, original index and kind are its **anchor's** (its first member's). In training each non-anchor
member's weight is ``1`` in value with the gradient of ``sigmoid((sim - tau) / STE_TEMPERATURE)``
(straight-through), so the threshold, and through it the modulator, learns from the task loss.

**Gated residuals** (``use_residuals``): ``out_c = mean_c + sum_j w_j g_j (x_j - mean_c) / sum_j w_j`` with
``g_j = sigmoid(gate([x_j, x_j - mean_c]))`` a learned scalar per member. The gate starts at zero weights:
a constant ``g`` re-adds nothing (the weighted deviations sum to zero), so it starts as plain merging and
learns which members' detail to put back.

**Contrastive regularisation** (:func:`contrastive_loss`) on a projection head ``z = P(x)``: members are
pulled toward their centroid (``1 - cos(z_j, z_c)``, clusters of >= 2 members) and centroids of different
clusters of a row pushed apart while closer than ``contrastive_margin`` in cosine distance
(``max(0, margin - (1 - cos(z_c, z_d)))``); scaled by ``contrastive_weight``. Before the LLM it goes to
``batch.losses``; inside the LLM to the stage's ``aux_losses``, which the model's forward adds to its
loss (:func:`pipeline.llm.collect_losses`).

**Emergency parachute** (:class:`EmergencyParachute`): loosens compression when the LM loss spikes and
tightens it again after sustained improvement, within bounds, logging every change.
"""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Compression",
    "EmergencyParachute",
    "RecursiveCompressionLayer",
    "anchor_clusters",
    "attention_similarity",
    "cluster_means",
    "compression_stats",
    "contrastive_loss",
    "cosine_similarity_matrix",
    "depth_threshold",
    "smooth_floor",
    "similarity_statistics",
]

log = logging.getLogger(__name__)

SHARPNESS = 20.0
"""beta of the smooth floor ``floor + softplus(beta (v - floor)) / beta``: within ~0.035 of ``max(v, floor)``."""
STE_TEMPERATURE = 0.05
"""Temperature of the straight-through membership weights (in similarity units)."""


# ---------------------------------------------------------------------------------------------- similarity
def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def cosine_similarity_matrix(x: Tensor, mask: Tensor) -> Tensor:
    """(B, L, D), (B, L) bool -> (B, L, L) cosine similarities (float32 or wider); 0 where either is padding."""
    z = F.normalize(x.to(_work_dtype(x)), dim=-1)
    z = z * mask.unsqueeze(-1).to(z.dtype)
    return z @ z.transpose(1, 2)  # (B, L, L)


def attention_similarity(attn: Tensor, mask: Tensor) -> Tensor:
    """Cosine similarity of the tokens' attention profiles.

    ``attn (B, H, Q, T)``: the probe's probabilities (queries' rows that do not ask are all-zero and add
    nothing); token ``t``'s profile is ``attn[:, :, :, t]`` flattened to ``(H * Q,)``. Returns (B, T, T); 0
    where either token is padding or received no attention at all.
    """
    b, h, q, t = attn.shape
    profile = attn.permute(0, 3, 1, 2).reshape(b, t, h * q)  # (B, T, H*Q)
    return cosine_similarity_matrix(profile, mask)


def similarity_statistics(sim: Tensor, pair_mask: Tensor, k: float) -> Tensor:
    """Per row ``mean + k * std`` of ``sim (B, L, L)`` over the pairs where ``pair_mask (B, L, L)``; a row
    without pairs gets ``-inf`` (the floor then decides). (B,)."""
    w = pair_mask.to(sim.dtype)
    n = w.sum((1, 2))
    mean = (sim * w).sum((1, 2)) / n.clamp(min=1)
    var = (((sim - mean[:, None, None]) ** 2) * w).sum((1, 2)) / n.clamp(min=1)
    stat = mean + k * var.clamp(min=0).sqrt()
    return torch.where(n > 0, stat, torch.full_like(stat, -math.inf))


def smooth_floor(value: Tensor, floor: float | Tensor, sharpness: float = SHARPNESS) -> Tensor:
    """``floor + softplus(sharpness * (value - floor)) / sharpness``: a smooth ``max(value, floor)`` that is
    never below ``floor`` (``value = -inf`` gives exactly ``floor``)."""
    return floor + F.softplus(sharpness * (value - floor)) / sharpness


def depth_threshold(layer: int, num_layers: int, conservative: float, moderate: float, aggressive: float) -> float:
    """The threshold of a stage whose result layer ``layer`` of ``num_layers`` first sees: relative depth
    ``layer / num_layers < 0.3`` -> ``conservative``, ``< 0.7`` -> ``moderate``, else ``aggressive``."""
    depth = layer / num_layers
    return conservative if depth < 0.3 else moderate if depth < 0.7 else aggressive


# ---------------------------------------------------------------------------------------------- clustering
def _runs(eligible: Tensor, kind: Tensor | None) -> Tensor:
    """(B, L) run id: a run is a maximal stretch of consecutive mergeable tokens of one kind; every other
    token is a run of its own."""
    same = eligible[:, 1:] & eligible[:, :-1]
    if kind is not None:
        same = same & (kind[:, 1:] == kind[:, :-1])
    start = torch.cat([torch.ones_like(eligible[:, :1]), ~same], dim=1)
    return start.long().cumsum(1)


def anchor_clusters(sim: Tensor, eligible: Tensor, threshold: Tensor, kind: Tensor | None = None,
                    size: Tensor | None = None, max_cluster_size: float | None = None) -> tuple[Tensor, Tensor]:
    """Anchor-chain clustering (see the module docstring).

    sim (B, L, L); eligible (B, L) bool (tokens that may merge); threshold (B,); kind (B, L) long or None
    (runs break where it changes); size (B, L) float or None (ones); max_cluster_size: the most summed
    size a cluster may hold (None: unbounded). Returns ``anchor (B, L)`` bool and ``owner (B, L)`` long,
    the column of each token's anchor (a token that is not eligible is its own anchor).
    """
    b, l = eligible.shape
    dev = eligible.device
    if l == 0:
        return eligible.clone(), torch.zeros(b, 0, dtype=torch.long, device=dev)
    run = _runs(eligible, kind)
    cols = torch.arange(l, device=dev)
    after = cols.view(1, -1) > cols.view(-1, 1)  # (L, L): j > i
    link = (eligible.unsqueeze(2) & (run.unsqueeze(2) == run.unsqueeze(1))
            & (sim >= threshold.to(sim.dtype).view(b, 1, 1)))  # (B, L, L) i -> j
    if max_cluster_size is not None:
        s = torch.ones(b, l, dtype=torch.float64, device=dev) if size is None else size.to(torch.float64)
        cum = s.cumsum(1)  # summed size of columns i..j = cum[j] - cum[i] + s[i]
        link = link & ((cum.unsqueeze(1) - cum.unsqueeze(2) + s.unsqueeze(2)) <= max_cluster_size + 1e-9)
    brk = after & ~link  # (B, L, L) j > i that does not link to i
    brk = torch.cat([brk, torch.ones(b, l, 1, dtype=torch.bool, device=dev)], dim=2)  # sentinel column L
    nxt = brk.to(torch.uint8).argmax(2)  # (B, L) first break after each token (argmax: the first maximum)
    jump = torch.cat([nxt, torch.full((b, 1), l, dtype=torch.long, device=dev)], dim=1)  # (B, L+1), L: sink
    reached = torch.zeros(b, l + 1, dtype=torch.uint8, device=dev)
    reached[:, 0] = 1
    for _ in range(max(1, math.ceil(math.log2(l + 1)))):  # pointer doubling: chain steps < 2^k reached
        reached = reached.scatter_reduce(1, jump, reached, reduce="amax")
        jump = jump.gather(1, jump)
    anchor = reached[:, :l].bool()
    owner = torch.where(anchor, cols.expand(b, l), torch.zeros_like(cols).expand(b, l)).cummax(1).values
    return anchor, owner


def cluster_means(x: Tensor, owner: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted means per cluster, written at the anchor's column: (B, L, D) means (0 at columns that own
    nothing) and (B, L) summed weights. ``owner (B, L)`` anchor column of each token, ``weight (B, L)``."""
    w = weight.to(x.dtype)
    sums = torch.zeros_like(x).scatter_add(1, owner.unsqueeze(-1).expand_as(x), x * w.unsqueeze(-1))
    total = torch.zeros_like(w).scatter_add(1, owner, w)
    return sums / total.clamp(min=torch.finfo(total.dtype).tiny).unsqueeze(-1), total


def contrastive_loss(z: Tensor, z_centroid: Tensor, owner: Tensor, anchor: Tensor, mask: Tensor, weight: Tensor,
                     margin: float) -> Tensor:
    """Pull members toward their centroid, push centroids of a row's clusters apart (module docstring).

    z (B, L, P) projected members; z_centroid (B, L, P) projected centroids at anchor columns; owner (B, L);
    anchor, mask (B, L) bool; weight (B, L) member weights (sizes). Returns a 0-dim loss >= 0: the
    weight-averaged pull over members of clusters with at least two members (0 if none) plus the mean push
    over ordered pairs of distinct real clusters of a row (0 if none).
    """
    zc = F.normalize(z_centroid, dim=-1)
    own = zc.gather(1, owner.unsqueeze(-1).expand_as(zc))  # (B, L, P) each member's centroid
    members = torch.zeros_like(weight).scatter_add(1, owner, mask.to(weight.dtype))  # (B, L) members per anchor
    multi = mask & (members.gather(1, owner) >= 2)  # (B, L) tokens of clusters with >= 2 members
    w = weight * multi.to(weight.dtype)
    pull = 1 - (F.normalize(z, dim=-1) * own).sum(-1)  # (B, L)
    pull = (pull * w).sum() / w.sum().clamp(min=1e-12)
    real = anchor & mask
    pairs = real.unsqueeze(2) & real.unsqueeze(1) & ~torch.eye(real.shape[1], dtype=torch.bool, device=real.device)
    push = (margin - (1 - zc @ zc.transpose(1, 2))).clamp(min=0)  # (B, L, L)
    push = (push * pairs.to(push.dtype)).sum() / pairs.sum().clamp(min=1).to(push.dtype)
    return pull + push


@dataclass
class Compression:
    """What :meth:`RecursiveCompressionLayer.compress` found (B rows, L columns).

    merged (B, L, D): the cluster's token (mean + residual) at anchor columns, the input elsewhere;
    keep (B, L) bool: real anchors (one per cluster); size (B, L): the cluster's summed size at anchors,
    each token's own size elsewhere; owner (B, L) long: the column of each token's anchor, -1 for padding;
    threshold (B,): tau of each row; loss: the weighted contrastive loss (None unless training with
    ``contrastive_weight > 0``).
    """

    merged: Tensor
    keep: Tensor
    size: Tensor
    owner: Tensor
    threshold: Tensor
    loss: Tensor | None = None

    def stats(self, eligible: Tensor) -> dict[str, Tensor]:
        """0-dim tensors (no host read): mergeable tokens in / clusters out (means per row), their ratio,
        the mean threshold and the mean size of the clusters of mergeable tokens."""
        n_in = eligible.sum(1).float()
        n_out = (self.keep & eligible).sum(1).float()
        return {
            "tokens_in": n_in.mean().detach(), "tokens_out": n_out.mean().detach(),
            "compression_ratio": (n_out / n_in.clamp(min=1)).mean().detach(),
            "threshold": self.threshold.float().mean().detach(),
            "mean_cluster_size": (n_in.sum() / n_out.sum().clamp(min=1)).detach(),
        }


class RecursiveCompressionLayer(nn.Module):
    """Clusters similar consecutive tokens and merges each cluster into one (see the module docstring).

    Options: ``similarity_threshold`` (the floor of tau; > 1 merges nothing), ``attention_weight`` (share
    of attention-profile similarity, used when :meth:`compress` gets attention), ``adaptive_threshold``
    (statistics + modulator above the floor; False: tau = floor), ``threshold_std`` (k in mean + k std),
    ``max_offset`` (bound of the modulator's offset), ``modulator_dim``, ``use_residuals`` (the gate),
    ``contrastive_margin``, ``contrastive_weight`` (0: no loss and no projection head),
    ``projection_dim``, ``max_cluster_size`` (None: unbounded).
    ``threshold_raise`` (a plain attribute, 0.0) is added to the floor by :class:`EmergencyParachute`.
    """

    def __init__(self, dim: int, similarity_threshold: float = 0.85, attention_weight: float = 0.3,
                 adaptive_threshold: bool = True, use_residuals: bool = True, contrastive_margin: float = 0.2,
                 contrastive_weight: float = 0.1, threshold_std: float = 1.0, max_offset: float = 0.1,
                 modulator_dim: int = 64, projection_dim: int = 128, max_cluster_size: float | None = None):
        super().__init__()
        self.similarity_threshold = similarity_threshold
        self.attention_weight = attention_weight
        self.adaptive_threshold = adaptive_threshold
        self.use_residuals = use_residuals
        self.contrastive_margin = contrastive_margin
        self.contrastive_weight = contrastive_weight
        self.threshold_std = threshold_std
        self.max_offset = max_offset
        self.max_cluster_size = max_cluster_size
        self.threshold_raise = 0.0
        self.modulator = (nn.Sequential(nn.Linear(dim, modulator_dim), nn.GELU(), nn.Linear(modulator_dim, 1))
                          if adaptive_threshold else None)
        self.gate = None
        if use_residuals:
            self.gate = nn.Linear(2 * dim, 1, bias=False)  # a bias would get no gradient: sum_j w_j d_j = 0
            nn.init.zeros_(self.gate.weight)  # gate at zero = plain merging
        self.projection = (nn.Sequential(nn.Linear(dim, projection_dim), nn.GELU(), nn.Linear(projection_dim, projection_dim))
                           if contrastive_weight > 0 else None)

    @property
    def floor(self) -> float:
        """The lowest threshold in use: ``similarity_threshold + threshold_raise``."""
        return self.similarity_threshold + self.threshold_raise

    # ------------------------------------------------------------------ pieces
    def compute_similarity_matrix(self, x: Tensor, mask: Tensor, attention: Tensor | None = None) -> Tensor:
        """(B, L, L): cosine similarity of ``x (B, L, D)``, mixed with :func:`attention_similarity` of
        ``attention (B, H, Q, L)`` by ``attention_weight`` when given (and the weight is > 0)."""
        sim = cosine_similarity_matrix(x, mask)
        if attention is None or self.attention_weight == 0:
            return sim
        attn_sim = attention_similarity(attention.to(sim.dtype), mask)
        return (1 - self.attention_weight) * sim + self.attention_weight * attn_sim

    def compute_adaptive_threshold(self, sim: Tensor, mask: Tensor, context: Tensor) -> Tensor:
        """tau (B,) from ``sim (B, L, L)`` over the off-diagonal pairs of ``mask (B, L)`` (mergeable tokens)
        and ``context (B, D)``; never below :attr:`floor`; differentiable in the modulator."""
        b, l = mask.shape
        floor = self.floor
        if not self.adaptive_threshold:
            return torch.full((b,), floor, dtype=sim.dtype, device=sim.device)
        pairs = mask.unsqueeze(2) & mask.unsqueeze(1) & ~torch.eye(l, dtype=torch.bool, device=mask.device)
        stat = similarity_statistics(sim.detach(), pairs, self.threshold_std)  # a data-driven baseline
        offset = self.max_offset * torch.tanh(self.modulator(context.to(self.modulator[0].weight.dtype))).squeeze(-1)
        # at most max(floor, 1): statistics of near-identical tokens (mean + k std > 1) must not switch merging
        # off; only a floor above 1 does
        return smooth_floor(stat + offset.to(stat.dtype), floor).clamp(max=max(floor, 1.0))

    def compress(self, x: Tensor, mask: Tensor, eligible: Tensor | None = None, size: Tensor | None = None,
                 kind: Tensor | None = None, attention: Tensor | None = None) -> Compression:
        """Cluster and merge ``x (B, L, D)`` (real tokens: ``mask (B, L)``).

        ``eligible (B, L)`` bool: the tokens that may merge (default: every real one); ``size (B, L)``: their
        sizes (default ones); ``kind (B, L)``: runs break where it changes; ``attention (B, H, Q, L)``: probe
        probabilities for the attention term.
        """
        b, l, _ = x.shape
        eligible = mask if eligible is None else eligible & mask
        size = torch.ones(b, l, dtype=_work_dtype(x), device=x.device) if size is None else size.to(_work_dtype(x))
        sim = self.compute_similarity_matrix(x, eligible, attention)
        w_el = eligible.to(x.dtype).unsqueeze(-1)
        context = (x * w_el).sum(1) / w_el.sum(1).clamp(min=1)  # (B, D) mean of the mergeable tokens
        tau = self.compute_adaptive_threshold(sim, eligible, context)
        anchor, owner = anchor_clusters(sim.detach(), eligible, tau.detach(), kind, size, self.max_cluster_size)
        member = mask & ~anchor  # tokens merged into an earlier anchor
        weight = size * mask.to(size.dtype)
        if self.training:  # straight-through: value 1, gradient of sigmoid((sim - tau) / T) (module docstring)
            to_anchor = sim.gather(2, owner.unsqueeze(2)).squeeze(2) if l else sim.new_zeros(b, 0)  # (B, L) sim[j, a]
            soft = torch.sigmoid((to_anchor - tau.unsqueeze(1)) / STE_TEMPERATURE)
            weight = weight * torch.where(member, 1 + soft - soft.detach(), torch.ones_like(soft))
        xw = x.to(_work_dtype(x))
        mean, _ = cluster_means(xw, owner, weight)
        centroid = mean.gather(1, owner.unsqueeze(-1).expand_as(mean))  # (B, L, D) each token's centroid
        merged_all = mean
        if self.gate is not None:
            dev = xw - centroid  # (B, L, D)
            g = torch.sigmoid(self.gate(torch.cat([xw, dev], -1).to(self.gate.weight.dtype))).to(xw.dtype)  # (B, L, 1)
            residual, _ = cluster_means(g * dev, owner, weight)
            merged_all = mean + residual
        merged = torch.where(anchor.unsqueeze(-1), merged_all, xw).to(x.dtype)
        sizes = torch.zeros_like(size).scatter_add(1, owner, size * mask.to(size.dtype))
        out_size = torch.where(anchor, sizes, size)
        loss = None
        if self.training and self.projection is not None:
            dt = self.projection[0].weight.dtype
            z, zc = self.projection(xw.to(dt)), self.projection(mean.to(dt))
            loss = self.contrastive_weight * contrastive_loss(z, zc, owner, anchor & eligible, eligible,
                                                              weight.detach().to(z.dtype), self.contrastive_margin)
        owner = torch.where(mask, owner, torch.full_like(owner, -1))
        return Compression(merged=merged, keep=anchor & mask, size=out_size, owner=owner, threshold=tau, loss=loss)


def output_columns(owner: Tensor, keep: Tensor, width: int, right_aligned: bool) -> Tensor:
    """The assignment tensor: (B, L_in) long, the output column of each input token's cluster (-1 for
    padding), when the kept anchors ``keep (B, L_in)`` are gathered in order into ``width`` columns, real
    first (``right_aligned=False``) or ending at the last column (True, left padding)."""
    rank = keep.long().cumsum(1) - 1  # (B, L) rank of each anchor among the kept
    if right_aligned:
        rank = rank + (width - keep.sum(1, keepdim=True))
    col = rank.gather(1, owner.clamp(min=0))
    return torch.where(owner >= 0, col, torch.full_like(col, -1))


# ---------------------------------------------------------------------------------------------- monitoring
def compression_stats(stages) -> dict[str, dict[str, float]]:
    """``{stage key: {statistic: float}}`` of every stage in ``stages`` that recorded ``last_stats`` (0-dim
    tensors, read here: one host read per value; call where stats are logged, never in a forward). The
    key is the registry name, with ``@layer`` for stages inside the LLM."""
    out = {}
    for s in stages:
        stats = getattr(s, "last_stats", None)
        if not stats or not hasattr(s, "threshold_raise"):
            continue
        key = s.stage_name + (f"@{s.layer}" if getattr(s, "placement", "tokens") == "llm" else "")
        out[key] = {k: float(v) for k, v in stats.items()}
    return out


class EmergencyParachute:
    """Loosens compression when the LM loss spikes, tightens it back after sustained improvement.

    It manages one ``raise`` in ``[0, max_raise]`` that it sets as ``threshold_raise`` on every stage given
    (each stage's floor is then its ``similarity_threshold + raise``: always within
    ``[floor, floor + max_raise]``). Per step (:meth:`update` with the step's LM loss):

    - a **spike**: the loss exceeds ``ema * (1 + spike_tolerance)`` -> raise by ``step`` (less compression);
      the EMA is not fed the spike;
    - **sustained improvement**: ``patience`` consecutive steps whose loss is below the mean of the last
      ``window`` losses (the window full) -> lower by ``step`` and start counting again;
    - the EMA (decay ``ema_decay``) starts at the first loss; no decision before ``warmup`` losses.

    Every change is logged (``logging`` at INFO) and recorded in :attr:`events` as
    ``{"step", "old", "new", "reason", "loss", "ema"}``; :meth:`stats` is JSON-able.
    """

    def __init__(self, stages=(), step: float = 0.02, max_raise: float = 0.1, spike_tolerance: float = 0.5,
                 patience: int = 50, window: int = 20, ema_decay: float = 0.9, warmup: int = 5):
        for name, value, ok in (("step", step, step > 0), ("max_raise", max_raise, max_raise >= 0),
                                ("spike_tolerance", spike_tolerance, spike_tolerance >= 0),
                                ("patience", patience, patience >= 1), ("window", window, window >= 1),
                                ("ema_decay", ema_decay, 0 <= ema_decay < 1), ("warmup", warmup, warmup >= 1)):
            if not ok:
                raise ValueError(f"EmergencyParachute {name}={value!r} is out of range")
        self.stages = list(stages)
        self.step, self.max_raise, self.spike_tolerance = step, max_raise, spike_tolerance
        self.patience, self.ema_decay, self.warmup = patience, ema_decay, warmup
        self.raise_ = 0.0
        self.ema: float | None = None
        self.seen = 0
        self.recent: deque[float] = deque(maxlen=window)
        self.improving = 0
        self.events: list[dict] = []
        self._apply()

    def _apply(self) -> None:
        for s in self.stages:
            s.threshold_raise = self.raise_

    def _change(self, step: int, new: float, reason: str, loss: float) -> None:
        old, self.raise_ = self.raise_, min(self.max_raise, max(0.0, new))
        if self.raise_ == old:
            return
        event = {"step": int(step), "old": old, "new": self.raise_, "reason": reason, "loss": loss, "ema": self.ema}
        self.events.append(event)
        log.info("emergency parachute at step %d: threshold raise %.4f -> %.4f (%s; loss %.4f, ema %.4f)",
                 step, old, self.raise_, reason, loss, self.ema)
        self._apply()

    def update(self, step: int, loss: float) -> float:
        """Feed the LM loss of ``step`` (a host float); returns the raise now in force."""
        loss = float(loss)
        if not math.isfinite(loss):
            raise ValueError(f"EmergencyParachute.update: the loss of step {step} is {loss}; it needs finite losses")
        self.seen += 1
        if self.ema is None:
            self.ema = loss
            self.recent.append(loss)
            return self.raise_
        decide = self.seen > self.warmup
        if decide and loss > self.ema * (1 + self.spike_tolerance):
            self.improving = 0
            self._change(step, self.raise_ + self.step, "spike", loss)
            return self.raise_
        full = len(self.recent) == self.recent.maxlen
        self.improving = self.improving + 1 if full and loss < sum(self.recent) / len(self.recent) else 0
        self.recent.append(loss)
        self.ema = self.ema_decay * self.ema + (1 - self.ema_decay) * loss
        if decide and self.improving >= self.patience:
            self.improving = 0
            self._change(step, self.raise_ - self.step, "sustained improvement", loss)
        return self.raise_

    def stats(self) -> dict:
        """JSON-able: the raise in force, the EMA, the bounds, and every change."""
        return {"raise": self.raise_, "ema": self.ema, "step": self.step, "max_raise": self.max_raise,
                "thresholds": {getattr(s, "stage_name", type(s).__name__) + (f"@{s.layer}" if hasattr(s, "layer") else ""):
                               s.similarity_threshold + self.raise_ for s in self.stages if hasattr(s, "similarity_threshold")},
                "events": list(self.events)}

    def to_json(self) -> str:
        return json.dumps(self.stats())
