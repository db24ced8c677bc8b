"""TOVA: Token Omission Via Attention (Oren et al., "Transformers are Multi-State RNNs", 2024).

The KV cache of every covered layer holds at most ``cache_max_size`` tokens per row and KV head. After
the prompt, and after every generated token, the current query's attention decides: the lowest-scored
tokens leave (after the prompt: all but ``cache_max_size``; then one per step once it is full).

Head strategies (how the query heads that share a KV head vote):

- ``mean``: the average of their attention (the paper averages over all heads of the layer; set
  ``per_kv_head: false`` for that, one choice shared by every KV head);
- ``max``: the largest attention any of them pays;
- ``weighted``: a weighted average with per-head weights (``head_weights``, a (layers, heads) buffer
  initialised to 1, not saved in checkpoints) that adapt while decoding: after every eviction each head's weight moves by
  ``head_weight_lr`` towards its share of the attention mass that lands on the kept tokens (its
  contribution to the kept set, normalised to mean 1 over the heads of the layer), so heads whose
  attention the kept set serves count more. The trajectory is recorded every ``history_every``
  evictions; :meth:`TOVA.visualize_head_weights` plots it. The weights are one set per layer, shared
  by the rows of a batch and carried from call to call, so with ``weighted`` an answer depends on what
  the policy decoded before and on the other rows of its batch (``mean`` and ``max`` do not).

Entropy-enhanced importance (``entropy_weight`` = beta >= 0): a token's score per head is
``a + beta * (-a * log a)``, its attention plus its share of the head's attention entropy (its
self-information ``-log a`` weighted by how often it is read), which lifts tokens that carry
information over those that merely absorb attention mass (sinks). ``beta = 0`` is plain TOVA.

``debug: true`` records per-layer statistics at each eviction (``policy.stats[layer]``: slots kept and
evicted, attention mass kept, mean / min kept position, media share kept) and logs them at DEBUG level
on the ``pipeline.llm`` logger.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor

from ..llm import TEXT_KIND, CachePolicy, CacheView
from ..registry import register
from ..types import NonNegFloat, NonNegInt, PosInt

logger = logging.getLogger("pipeline.llm")

Rate = Annotated[float, Field(ge=0, le=1)]


@register("tova")
class TOVA(CachePolicy):
    def __init__(
        self,
        dim: int | None = None,
        cache_max_size: PosInt = 512,
        layers: list[NonNegInt] | None = None,
        head_strategy: Literal["mean", "max", "weighted"] = "mean",
        per_kv_head: bool = True,
        entropy_weight: NonNegFloat = 0.0,
        head_weight_lr: Rate = 0.1,
        history_every: PosInt = 1,
        debug: bool = False,
    ):
        super().__init__(cache_max_size, layers)
        self.head_strategy = head_strategy
        self.per_kv_head = per_kv_head
        self.entropy_weight = entropy_weight
        self.head_weight_lr = head_weight_lr
        self.history_every = history_every
        self.debug = debug
        # (layers, heads), sized by bind(): adapted while decoding, so a buffer outside the state dict
        # (a checkpoint never depends on how long a model has been generating)
        self.register_buffer("head_weights", None, persistent=False)
        self.history: dict[int, list[tuple[int, Tensor]]] = {}
        self._evictions: dict[int, int] = {}  # per call (reset at every prefill)
        self._weight_updates: dict[int, int] = {}  # over every call, as the head weights

    def bind(self, num_layers: int, num_heads: int, num_kv_heads: int) -> None:
        super().bind(num_layers, num_heads, num_kv_heads)
        if self.head_weights is None or tuple(self.head_weights.shape) != (num_layers, num_heads):
            self.head_weights = torch.ones(num_layers, num_heads)
            self.history, self._weight_updates = {}, {}  # fresh weights (another model): a fresh trajectory

    @property
    def graph_safe(self) -> bool:
        """A decoding step can be captured in a CUDA graph: no host reads (debug stats, weight history)."""
        return not self.debug and self.head_strategy != "weighted"

    # ------------------------------------------------------------------ scoring
    def head_importance(self, attn: Tensor) -> Tensor:
        """(B, H, Q, T) probabilities -> (B, H, T) per-head importance (queries averaged)."""
        a = attn.float().mean(dim=2)
        if self.entropy_weight > 0:
            info = -a * torch.log(a.clamp_min(1e-30))  # each token's share of the head's entropy
            a = a + self.entropy_weight * info
        return a

    def score(self, view: CacheView) -> Tensor:
        imp = self.head_importance(view.attn)  # (B, H, T)
        b, h, t = imp.shape
        hkv = view.num_kv_heads
        if self.head_strategy == "weighted":
            w = self._weights(view.layer, imp)  # (H,)
            imp = imp * w.view(1, h, 1)
        if not self.per_kv_head:  # one choice for the whole layer, shared by every KV head
            pooled = imp.max(dim=1).values if self.head_strategy == "max" else imp.sum(dim=1)
            if self.head_strategy != "max":
                pooled = pooled / (w.sum() if self.head_strategy == "weighted" else h)
            return pooled.unsqueeze(1).expand(b, hkv, t)
        grouped = imp.view(b, hkv, h // hkv, t)
        if self.head_strategy == "max":
            return grouped.max(dim=2).values
        if self.head_strategy == "weighted":
            return grouped.sum(dim=2) / w.view(hkv, h // hkv).sum(dim=1).view(1, hkv, 1)
        return grouped.mean(dim=2)

    def _weights(self, layer: int, imp: Tensor) -> Tensor:
        if self.head_weights is None:  # used outside a model: one weight per head of this view
            self.bind(layer + 1, imp.shape[1], imp.shape[1])
        if self.head_weights.device != imp.device:
            self.head_weights = self.head_weights.to(imp.device)
        return self.head_weights[layer].to(imp.dtype)

    # ------------------------------------------------------------------ after an eviction
    def observe(self, view: CacheView, keep: Tensor) -> None:
        layer = view.layer
        n = self._evictions.get(layer, 0) + 1
        self._evictions[layer] = n
        need_mass = self.head_strategy == "weighted" or self.debug
        if not need_mass:
            return
        attn = view.attn.float().mean(dim=2)  # (B, H, T)
        b, h, t = attn.shape
        hkv = view.num_kv_heads
        kept = torch.zeros(b, hkv, t, dtype=torch.bool, device=attn.device).scatter_(2, keep, True)
        kept = kept & view.valid
        kept_h = kept.repeat_interleave(h // hkv, dim=1)  # (B, H, T) which KV slots each query head keeps
        mass = (attn * kept_h).sum(-1)  # (B, H) attention mass each head keeps
        if self.head_strategy == "weighted" and self.head_weight_lr > 0:
            contrib = mass.mean(0)
            contrib = contrib / contrib.mean().clamp_min(1e-12)  # mean 1 over the heads of the layer
            w = self.head_weights[layer]
            w.mul_(1 - self.head_weight_lr).add_(self.head_weight_lr * contrib.to(w))
            # the weights live on across calls, so their trajectory counts updates over every call
            # (not the per-call eviction count, which restarts at each prefill)
            u = self._weight_updates.get(layer, 0) + 1
            self._weight_updates[layer] = u
            if (u - 1) % self.history_every == 0:
                self.history.setdefault(layer, []).append((u, w.detach().cpu().clone()))
        if self.debug:
            pos = torch.where(kept, view.positions, torch.zeros_like(view.positions))
            n_kept = kept.sum(-1).clamp_min(1)
            media = kept & (view.kind != TEXT_KIND)
            stats = {
                "phase": view.phase,
                "evictions": n,
                "slots": float(view.valid.sum(-1).float().mean()),
                "kept": float(kept.sum(-1).float().mean()),
                "evicted": float((view.valid & ~kept).sum(-1).float().mean()),
                "attention_kept": float(mass.mean()),
                "mean_kept_position": float((pos.sum(-1) / n_kept).mean()),
                "min_kept_position": int(torch.where(kept, view.positions, torch.full_like(pos, 2**62)).min()),
                "media_kept_share": float(media.sum(-1).float().mean() / n_kept.float().mean()),
            }
            self.stats[layer] = stats
            logger.debug("tova layer %d: %s", layer, stats)

    def reset(self) -> None:
        super().reset()
        self._evictions = {}

    # ------------------------------------------------------------------ the head-weight plot
    def visualize_head_weights(self, save_path: str | Path, layers: list[int] | None = None) -> Path:
        """Write a PNG of the head weights over evictions (one panel per layer, one line per head).

        Needs ``head_strategy: weighted`` and at least one recorded eviction; ``layers`` picks panels
        (default: every recorded layer, at most 16).
        """
        if self.head_strategy != "weighted":
            raise ValueError(f"head weights exist only with head_strategy 'weighted' (this TOVA uses {self.head_strategy!r})")
        if not self.history:
            raise ValueError("no head weights recorded yet: generate with this policy installed first")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:  # pragma: no cover - matplotlib is a project dependency
            raise ImportError("visualize_head_weights needs matplotlib: pip install matplotlib") from e
        chosen = sorted(self.history) if layers is None else list(layers)
        missing = [i for i in chosen if i not in self.history]
        if missing:
            raise ValueError(f"no head weights recorded for layers {missing}; recorded: {sorted(self.history)}")
        chosen = chosen[:16]
        cols = min(4, len(chosen))
        rows = -(-len(chosen) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
        for ax, layer in zip(axes.flat, chosen):
            steps = [s for s, _ in self.history[layer]]
            w = torch.stack([x for _, x in self.history[layer]])  # (records, H)
            for head in range(w.shape[1]):
                ax.plot(steps, w[:, head].numpy(), lw=1)
            ax.set_title(f"layer {layer}")
            ax.set_xlabel("eviction")
            ax.set_ylabel("head weight")
        for ax in list(axes.flat)[len(chosen):]:
            ax.axis("off")
        fig.suptitle(f"TOVA head weights (lr {self.head_weight_lr}, cache {self.cache_max_size})")
        fig.tight_layout()
        path = Path(save_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def extra_repr(self) -> str:
        return (f"cache_max_size={self.cache_max_size}, head_strategy={self.head_strategy!r}, "
                f"per_kv_head={self.per_kv_head}, entropy_weight={self.entropy_weight}")
