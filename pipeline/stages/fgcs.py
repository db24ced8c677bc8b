"""``fgcs``: DeFT's Feedback-Guided Compression and Selection.

Reference: Liu & Yu, "DeFT: Decoupled and Feedback-Guided Tokenization for Efficient Multimodal
Long-Context Modeling", ICML 2025 (New In ML), https://dev.icml.cc/virtual/2025/50483 .

Three signals decide which tokens stay:

1. **semantic saliency** ``s``: a 3-layer MLP on the ``sam`` features (or on the tokens without
   ``sam``), one logit per token;
2. **group-aware scoring** ``g``: the mean saliency of the token's group, chosen by modality
   (image 8-connected neighbours, video ±2 frames, text top-5 semantic neighbours; see
   :mod:`pipeline.group`). The selection score is ``semantic_weight * s + group_weight * g``;
3. **feedback-aware importance** (training only): in the SAME backward pass that trains the model,
   the task loss's gradient ``g = dL/dx`` with respect to the kept tokens gives each its gradient × input
   importance, ``feedback_signal``: ``l1`` (the default) ``sum_d |g_d * x_d|``; ``dot``
   ``|sum_d g_d * x_d|``; ``grad_norm`` ``||g||_2``; normalised per row to [0, 1] by the row's maximum.
   ``dot`` (this stage's only signal before 2026-12-07) is the first-order change of the loss when the
   token is scaled, and its terms cancel: on pass-key (a trained 4-layer base, 64-128-token passages)
   the first digit of the key, the token the answer starts with, gets a ``dot`` target of about 0 in
   most passages, so only 6 % of keys were whole among the target's top quarter, against 82 % with
   ``l1`` or ``grad_norm`` (``eval/needle_recall.py``). ``feedback_target``: ``scaled`` (the default) is the
   importance over the row's maximum; ``top`` labels the row's ``ceil(feedback_top * n)`` most important
   tokens 1 and the rest 0, so the saliency head learns how likely a token is to be among the few that
   matter, which is what a top-k selection needs, instead of how large its gradient is next to the
   largest one (a gradient is as large as the loss left on the answer token that reads the token, so a
   needed token whose answer token is already fit well gets a small scaled target). It is
   the target that teaches the saliency head: ``feedback_weight * (mean BCE(s, t) +
   alpha_var * var(sigmoid(s) - t))`` per row over the kept tokens. Binary cross-entropy on the
   logits keeps its gradient ``sigmoid(s) - t`` when the saliency saturates (a squared error on
   ``sigmoid(s)`` does not: the straight-through gate alone drove the logits to -30..-200 in an H100
   run, where that gradient vanished). The variance term penalises a fit that is good on average but
   uneven across a row's tokens. Pruned tokens never reach the loss, so
   they have no feedback and are left out of this loss (at retention 1.0 every token has one).
   No second backward runs: an identity autograd function on the tokens receives their gradient,
   computes the target and returns the saliency loss's gradient to ``s`` on the way back.

Selection is a hard top-k (ties: earlier token wins) in train and eval. ``merge_pruned`` adds the
*compression* half of the name: each token that is not kept is merged into the kept token whose
semantic feature (the ``sam`` features, else the tokens) is most similar, and every kept token
becomes the mean of itself and the tokens that joined it (:func:`pipeline.ops.merge_into_kept`), so
what the LLM sees still summarises every token. The merge is differentiable, so the task loss
reaches the pruned tokens too and the feedback target then covers every real token, kept or not
(without it, pruned tokens get no feedback). The pruned tokens are still reported in ``pruned``
(their own values) for a recovery stage. ``explore_temperature`` > 0
makes the training selection a Gumbel top-k: ``top-k(score + temperature * Gumbel noise)``, a sample
without replacement from ``softmax(score / temperature)``. Feedback exists only for kept tokens, so
without exploration a token the scorer ranks low is never kept and can never earn a better target;
the noise gives it the chance (eval stays deterministic). In training the kept tokens
pass a straight-through gate so the task loss also reaches the scorer directly:
``x + x * (sigmoid(score) - sigmoid(score).detach())``, equal to ``x`` in value.

**Question-aware saliency** (``query_weight`` > 0; not in the paper): the tokens that matter depend on
what is asked, so a query-conditioned term joins the saliency logit. The query is
``TokenBatch.query (B, Q, D)``: per row, the LLM input embeddings of its own sample's PROMPT text
(``LlavaDeftForCausalLM`` forms it: real, non-placeholder, non-special tokens of the prompt, and in
training only the positions whose label is ``IGNORE_INDEX``, so the answer is never part of it; the
embeddings are detached, so this stage cannot train the LLM's embedding table). With
``q_j = W_q query_j`` and ``k_i = W_k x_i`` (``query_dim`` = d wide, no bias; ``x`` the scorer's input:
the ``sam`` features or the tokens), each valid query token ``j`` attends over the row's ``n`` real
tokens, ``p_ji = softmax_i(q_j . k_i / sqrt(d))``, and the attention a token receives, averaged over the
row's ``Q_v`` valid query tokens, ``a_i = (1/Q_v) sum_j p_ji``, becomes the relevance logit
``r_i = log(n * a_i + 1e-6)`` (about 0 for uniform attention, > 0 for tokens the question points at).
The saliency logit used everywhere (selection score, group term, straight-through gate and the
feedback BCE fit) is ``s + query_weight * r``, so the feedback target trains ``W_q`` and ``W_k`` as well
as the MLP. A row without a valid query token (a blank input, a prompt with no text) gets ``r = 0``.
Image, video, audio and text rows are treated alike. ``query_weight = 0`` (the default) builds no
``W_q`` / ``W_k`` and computes nothing: the stage is exactly DeFT's. A batch without a query raises
``ValueError`` when ``query_weight`` > 0 (the model attaches it; standalone, pass
``TokenBatch.from_tokens(..., query=..., query_mask=...)``).

``query_keys``: what ``W_k`` reads, ``input`` (the scorer's input, above) or ``tokens`` (the media tokens
themselves, which the projector has put in the LLM's embedding space, the space of the query).
``query_init: tied`` (needs keys as wide as the query, so ``query_keys: tokens``) starts ``W_k`` equal to
``W_q``: then ``q . k`` is a random projection of the dot product of a question token's embedding and a
media token, so the relevance points at tokens like the question's words (pass-key's "pass key"
sentence) before any training; ``random`` (the default) draws both independently.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from ..batch import TokenBatch
from ..group import group_mean, group_neighbours
from ..ops import budget, budget_widths, keep_mask_topk, merge_into_kept, split_by_mask
from ..registry import register
from ..types import NonNegFloat, NonNegInt, PosInt, Ratio


FEEDBACK_SIGNALS = ("l1", "dot", "grad_norm")
"""The importance a token's gradient ``g`` and value ``x`` give (module docstring, item 3)."""


def feedback_importance(grad: Tensor, tokens: Tensor, signal: str = "l1") -> Tensor:
    """Gradient × input importance, (B, N, D) x2 -> (B, N) fp32: ``l1`` ``sum_d |g_d x_d|``, ``dot``
    ``|sum_d g_d x_d|``, ``grad_norm`` ``||g||_2`` (``tokens`` unused)."""
    g = grad.float()
    if signal == "grad_norm":
        return torch.linalg.vector_norm(g, dim=-1)
    gx = g * tokens.float()
    if signal == "dot":
        return gx.sum(-1).abs()
    if signal == "l1":
        return gx.abs().sum(-1)
    raise ValueError(f"unknown feedback_signal {signal!r}; choose one of {list(FEEDBACK_SIGNALS)}")


def normalise_importance(importance: Tensor, valid: Tensor) -> Tensor:
    """Scale each row's importance to [0, 1] by its maximum over ``valid`` tokens (0 elsewhere)."""
    imp = torch.where(valid, importance, torch.zeros_like(importance))
    top = imp.amax(dim=1, keepdim=True)
    return torch.where(top > 0, imp / top.clamp(min=torch.finfo(imp.dtype).tiny), torch.zeros_like(imp))


def top_share_target(importance: Tensor, valid: Tensor, share: float) -> Tensor:
    """1.0 at each row's ``ceil(share * n_valid)`` most important ``valid`` tokens (ties: earlier first), else 0."""
    keep = keep_mask_topk(importance, valid, budget(valid.sum(1), share))
    return keep.to(importance.dtype)


def feedback_loss(logits: Tensor, target: Tensor, valid: Tensor, alpha_var: float) -> Tensor:
    """Mean over rows with a valid token of ``mean BCE(logits, t) + alpha_var * var(sigmoid(logits) - t)``."""
    w = valid.float()
    n = w.sum(1)  # (B,)
    x = logits.float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, target, reduction="none") * w
    r = (torch.sigmoid(x) - target) * w
    mean_r = r.sum(1) / n.clamp(min=1)
    var = (((r - mean_r[:, None]) * w) ** 2).sum(1) / n.clamp(min=1)
    per_row = bce.sum(1) / n.clamp(min=1) + alpha_var * var
    rows = (n > 0).float()
    return (per_row * rows).sum() / rows.sum().clamp(min=1)


QUERY_EPS = 1e-6
"""``r = log(n * a + QUERY_EPS)``: bounds the relevance logit of a token no query token attends to."""


def query_relevance(q: Tensor, k: Tensor, query_mask: Tensor, mask: Tensor) -> Tensor:
    """The relevance logit ``r (B, N)`` fp32 of each token to its row's query (see the module docstring).

    ``q (B, Q, d)`` projected query tokens, ``k (B, N, d)`` projected token keys, ``query_mask (B, Q)`` and
    ``mask (B, N)`` bool. ``r_i = log(n * mean_j softmax_i(q_j . k_i / sqrt(d)) + QUERY_EPS)`` over the
    valid query tokens ``j`` and the row's ``n`` real tokens; 0 at padding and in rows without a valid
    query token. Batched; no host sync.

    A masked matmul + softmax, not ``scaled_dot_product_attention``: SDPA returns the attention-weighted
    values, never the weights, and ``a_i`` sums the weights over the QUERY axis, which SDPA cannot
    contract without an (N, N) identity as values. ``(B, Q, N)`` scores are small here (a prompt's tokens
    times a row's media tokens).
    """
    logits = (q.float() @ k.float().transpose(1, 2)) / math.sqrt(q.shape[-1])  # (B, Q, N)
    logits = logits.masked_fill(~mask[:, None, :], torch.finfo(torch.float32).min)
    attn = torch.softmax(logits, dim=-1) * mask[:, None, :]  # (B, Q, N); a row of no real token: all 0
    w = query_mask.float()  # (B, Q)
    n_query = w.sum(1)  # (B,)
    a = (attn * w[..., None]).sum(1) / n_query.clamp(min=1)[:, None]  # (B, N) mean attention received
    n = mask.sum(1, keepdim=True).float()  # (B, 1)
    r = torch.log(n * a + QUERY_EPS)
    return torch.where(mask & (n_query > 0)[:, None], r, torch.zeros_like(r))


class _FeedbackTap(torch.autograd.Function):
    """Identity on ``tokens``; its backward turns their gradient into the saliency head's target.

    forward(tokens (B, N, D), logits (B, N), valid (B, N), stage) -> tokens. backward: returns the
    incoming gradient unchanged to ``tokens`` and ``feedback_weight * d(feedback_loss)/d logits``
    to ``logits``. The stage keeps the last target and loss in ``stage.last_feedback`` (monitoring).
    """

    @staticmethod
    def forward(ctx, tokens, logits, valid, stage):
        ctx.save_for_backward(tokens, logits, valid)
        ctx.stage = stage
        return tokens.clone()

    @staticmethod
    def backward(ctx, grad):
        tokens, logits, valid = ctx.saved_tensors
        stage = ctx.stage
        importance = feedback_importance(grad, tokens, stage.feedback_signal)
        target = stage.feedback_target_of(importance, valid)
        with torch.enable_grad():
            s = logits.detach().requires_grad_(True)
            loss = feedback_loss(s, target, valid, stage.alpha_var)
            (g_s,) = torch.autograd.grad(loss * stage.feedback_weight, s)
        stage.last_feedback = {"importance": importance.detach(), "target": target, "loss": loss.detach()}
        if stage.keep_feedback_grad:  # diagnostics (eval/needle_recall.py): every signal from the same gradient
            stage.last_feedback.update(grad=grad.detach(), tokens=tokens.detach())
        return grad, g_s.to(logits.dtype), None, None


@register("fgcs")
class FGCS(nn.Module):
    """Score tokens by saliency + group, keep the top ``ceil(retention_ratio * n)`` per row; learn from feedback.

    Input: ``batch.features (B, N, S)`` when the pipeline has a feature stage (``sam``) before this one
    (the builder passes ``feature_dim=S``), otherwise ``batch.tokens (B, N, D)``.
    Output: the kept tokens in original order, ``scores (B, K)`` (the combined score), the rest in
    ``pruned``. ``stats["fgcs"]["feedback_loss"]`` is the feedback loss of the previous backward.
    ``feedback_weight=0`` switches the feedback signal off (the ablation); ``feedback_signal`` picks the
    gradient × input importance (``l1``, ``dot``, ``grad_norm``) and ``feedback_target`` what the head fits
    (``scaled``, or ``top``: the ``feedback_top`` share of each row); ``group_weight=0`` the
    group term; ``merge_pruned=True`` merges the pruned tokens into the kept ones. ``query_weight`` > 0
    adds the question-aware relevance ``query_weight * r`` to the saliency logit (``query_dim``: width of
    its projections; reads ``batch.query``, see the module docstring).
    """

    selects_tokens = True  # kept tokens are input rows (the gates leave their values unchanged); not with merge_pruned

    def __init__(
        self,
        dim: int,
        retention_ratio: Ratio = 0.482,
        hidden_dim: PosInt = 256,
        semantic_weight: NonNegFloat = 1.0,
        group_weight: NonNegFloat = 0.5,
        feedback_weight: NonNegFloat = 1.0,
        feedback_signal: Literal["l1", "dot", "grad_norm"] = "l1",
        feedback_target: Literal["scaled", "top"] = "scaled",
        feedback_top: Ratio = 0.25,
        alpha_var: NonNegFloat = 0.1,
        text_k: NonNegInt = 5,
        video_radius: NonNegInt = 2,
        explore_temperature: NonNegFloat = 0.0,
        merge_pruned: bool = False,
        query_weight: NonNegFloat = 0.0,
        query_dim: PosInt = 64,
        query_keys: Literal["input", "tokens"] = "input",
        query_init: Literal["random", "tied"] = "random",
        feature_dim: int | None = None,
    ):
        super().__init__()
        if semantic_weight == 0 and group_weight == 0:
            raise ValueError("fgcs needs semantic_weight > 0 or group_weight > 0 (both are 0: every score would tie)")
        self.retention_ratio = retention_ratio
        self.semantic_weight = semantic_weight
        self.group_weight = group_weight
        self.feedback_weight = feedback_weight
        self.feedback_signal = feedback_signal
        self.feedback_target = feedback_target
        self.feedback_top = feedback_top
        self.keep_feedback_grad = False  # True: last_feedback also holds the tokens' gradient and values
        self.alpha_var = alpha_var
        self.text_k = text_k
        self.video_radius = video_radius
        self.explore_temperature = explore_temperature
        self.merge_pruned = merge_pruned
        self.selects_tokens = not merge_pruned  # merged kept tokens are means, not input rows
        self.use_features = feature_dim is not None
        in_dim = feature_dim if feature_dim is not None else dim
        self.saliency = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, 1),
        )
        self.query_weight = query_weight
        self.query_dim = query_dim
        self.query_keys = query_keys
        self.query_init = query_init
        key_dim = dim if query_keys == "tokens" else in_dim
        if query_init == "tied" and key_dim != dim:
            raise ValueError(
                f"fgcs query_init='tied' needs keys as wide as the prompt embeddings ({dim}), but query_keys="
                f"{query_keys!r} gives width {key_dim} (the sam features); set query_keys: tokens or query_init: random"
            )
        if query_weight > 0:  # built only when used: query_weight 0 keeps DeFT's parameters, init and state dict
            self.query_proj = nn.Linear(dim, query_dim, bias=False)  # W_q on the prompt embeddings (width D)
            self.key_proj = nn.Linear(key_dim, query_dim, bias=False)  # W_k on the scorer's input or the tokens
            if query_init == "tied":  # q.k = (W x).(W y): a random projection of the embedding dot product
                with torch.no_grad():
                    self.key_proj.weight.copy_(self.query_proj.weight)
        self.last_feedback: dict[str, Tensor] = {}

    @property
    def needs_query(self) -> bool:
        """Read by the model: it then sets ``TokenBatch.query`` / ``query_mask`` (the prompt's embeddings)."""
        return self.query_weight > 0

    def _inputs(self, batch: TokenBatch) -> Tensor:
        if not self.use_features:
            return batch.tokens  # (B, N, D)
        if batch.features is None:
            raise ValueError(
                "fgcs was built to score semantic features (feature_dim was given) but the batch "
                "has no `features`; put a feature stage such as 'sam' before it"
            )
        return batch.features  # (B, N, S)

    def relevance(self, batch: TokenBatch, inputs: Tensor | None = None) -> Tensor:
        """Question-aware relevance logits ``r`` (B, N) fp32 of the tokens to ``batch.query`` (module
        docstring). ``inputs``: the scorer's input when the caller has it (``self._inputs(batch)``)."""
        if batch.query is None:
            raise ValueError(
                f"fgcs has query_weight={self.query_weight} (question-aware saliency) but the batch has no `query`: "
                "LlavaDeftForCausalLM attaches the prompt's embeddings itself; standalone, pass "
                "TokenBatch.from_tokens(..., query=(B, Q, D) embeddings, query_mask=(B, Q)) or batch.with_query(...); "
                "or set query_weight: 0"
            )
        if self.query_keys == "tokens":
            x = batch.tokens
        else:
            x = self._inputs(batch) if inputs is None else inputs
        dtype = self.query_proj.weight.dtype
        query = torch.where(batch.query_mask[..., None], batch.query, torch.zeros((), dtype=batch.query.dtype,
                                                                                   device=batch.query.device))
        q = self.query_proj(query.to(dtype))  # (B, Q, d); padded query tokens are zeros (and masked below)
        k = self.key_proj(x.to(dtype))  # (B, N, d)
        return query_relevance(q, k, batch.query_mask, batch.mask)

    def saliency_logits(self, batch: TokenBatch) -> Tensor:
        """Saliency logits (B, N); higher = keep: the MLP's ``s``, plus ``query_weight * r`` when
        ``query_weight`` > 0 (question-aware; see the module docstring)."""
        x = self._inputs(batch)
        s = self.saliency(x).squeeze(-1)
        if self.query_weight > 0:
            s = s + (self.query_weight * self.relevance(batch, x)).to(s.dtype)
        return s

    def combine(self, batch: TokenBatch, logits: Tensor) -> Tensor:
        """Selection score ``semantic_weight * s + group_weight * mean(s over the token's group)``, (B, N)."""
        score = self.semantic_weight * logits
        if self.group_weight > 0:
            pos, valid = group_neighbours(
                batch.index, batch.mask, batch.modality, batch.layout, self._inputs(batch).detach(),
                self.text_k, self.video_radius, kinds=batch.kinds,
            )
            score = score + self.group_weight * group_mean(logits, pos, valid)
        return score

    def score(self, batch: TokenBatch) -> Tensor:
        """The selection score (B, N)."""
        return self.combine(batch, self.saliency_logits(batch))

    def feedback_target_of(self, importance: Tensor, valid: Tensor) -> Tensor:
        """The saliency head's target (B, N) in [0, 1] from ``importance`` (B, N) over ``valid`` tokens:
        ``scaled`` by the row's maximum, or ``top``: 1 for the row's ``feedback_top`` share, else 0."""
        if self.feedback_target == "top":
            return top_share_target(importance, valid, self.feedback_top)
        return normalise_importance(importance, valid)

    def feedback_loss_from(self, task_loss: Tensor, tokens: Tensor, logits: Tensor, mask: Tensor) -> Tensor:
        """Explicit feedback (the seed API's ``task_loss``): target from ``d task_loss / d tokens``.

        ``tokens (B, N, D)`` must be in ``task_loss``'s graph (e.g. the loss of a pass that saw every
        token). Returns ``feedback_weight * feedback_loss`` on ``logits (B, N)`` over real tokens;
        the caller adds it to its loss. Uses ``torch.autograd.grad`` (the graph is retained).
        """
        if not tokens.requires_grad:
            raise ValueError("task_loss feedback needs tokens that require grad and were used to compute task_loss")
        (grad,) = torch.autograd.grad(task_loss, tokens, retain_graph=True, allow_unused=True)
        if grad is None:
            raise ValueError("task_loss does not depend on the tokens given to DeFT; pass the tokens its graph used")
        target = self.feedback_target_of(feedback_importance(grad, tokens.detach(), self.feedback_signal), mask)
        return self.feedback_weight * feedback_loss(logits, target, mask, self.alpha_var)

    def forward(self, batch: TokenBatch) -> TokenBatch:
        logits = self.saliency_logits(batch)  # (B, N)
        score = self.combine(batch, logits)
        rank_by = score.detach()
        if self.training and self.explore_temperature > 0:
            u = torch.rand_like(rank_by).clamp(min=torch.finfo(rank_by.dtype).tiny, max=1 - 1e-7)
            rank_by = rank_by - self.explore_temperature * torch.log(-torch.log(u))  # + T * Gumbel(0, 1)
        keep = keep_mask_topk(rank_by, batch.mask, budget(batch.lengths, self.retention_ratio))
        tokens = batch.tokens
        if self.training and self.feedback_weight > 0 and torch.is_grad_enabled() and tokens.requires_grad:
            # with merging every real token reaches the loss, so every one gets a feedback target
            has_feedback = batch.mask if self.merge_pruned else keep & batch.mask
            tokens = _FeedbackTap.apply(tokens, logits, has_feedback, self)
        if self.merge_pruned:
            tokens = merge_into_kept(tokens, self._inputs(batch), batch.mask, keep)
        out = split_by_mask(batch.replace(tokens=tokens, scores=score), keep, self.stage_name,
                            *budget_widths(keep.shape[1], self.retention_ratio))
        if "loss" in self.last_feedback:
            out.stats[self.stage_name]["feedback_loss"] = self.last_feedback["loss"]
        if not self.training:
            return out
        s = torch.sigmoid(out.scores) * out.mask  # (B, K); padding slots get no gate
        gate = (s - s.detach()).unsqueeze(-1)  # (B, K, 1): 0 in value, d/ds = 1
        return out.replace(tokens=out.tokens + out.tokens * gate)
