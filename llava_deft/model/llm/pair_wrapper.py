"""Seed 002's facade: a frozen causal LM whose chosen layers see a pair-compressed context (issue 17).

    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained("path/to/local/llama", local_files_only=True)
    model = ModelWrapperPretrained(base, layer_idx=[10], T_w=100, r=0.8, M=100)
    out = model(input_ids, attention_mask, labels=input_ids)      # windowed loss on the last T_w tokens
    model.generate(input_ids, attention_mask, max_new_tokens=32)

``layer_idx`` are the decoder layers whose input is compressed: a ``pair_compress`` stage
(``pipeline/stages/pair_compress.py``) runs between layer ``i - 1`` and layer ``i`` for each ``i``, through
:class:`~llava_deft.model.llm.decoder.DecoderLM`'s own layer loop (the HF model is never patched). The
base's parameters are frozen; only the compressors and scorers are trainable (:meth:`trainable_share`).

The loss is **windowed**: the window's tokens are never merged, so next-token cross-entropy is taken on the
last ``T_w`` positions of each row (and only where ``labels`` are not -100), as the seed's
``WindowedLossSFTTrainer`` does. The compressed layers see fewer tokens; the logits of the window are
exact positions of the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline import build_pipeline

from ..splice import IGNORE_INDEX, window_labels
from .decoder import DecoderLM, generate_from_embeds

__all__ = ["ModelWrapperPretrained", "windowed_lm_loss"]


def windowed_lm_loss(logits: Tensor, labels: Tensor, window: int, attention_mask: Tensor | None = None) -> Tensor:
    """Mean next-token cross-entropy on each row's last ``window`` real tokens (``attention_mask``: default all
    real): ``logits`` at ``t - 1`` predict ``labels`` at ``t``; labels of -100 are skipped
    (:func:`~llava_deft.model.splice.window_labels`)."""
    mask = torch.ones_like(labels) if attention_mask is None else attention_mask
    target = window_labels(labels, mask, window)[:, 1:]
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX)


class ModelWrapperPretrained(nn.Module):
    """A frozen HF causal LM (Llama, Qwen2, Qwen3) or :class:`DecoderLM` with pair compression before the
    decoder layers ``layer_idx`` (see the module docstring)."""

    def __init__(self, original_model: nn.Module, layer_idx: Sequence[int] = (10,), T_w: int = 100,  # noqa: N803
                 r: float = 0.8, M: int = 100, hidden_dim: int | None = None, num_heads: int = 8):  # noqa: N803
        super().__init__()
        self.lm = original_model if isinstance(original_model, DecoderLM) else DecoderLM(original_model)
        self.lm.requires_grad_(False)
        self.window = T_w
        layers = sorted(set(int(i) for i in layer_idx))
        cfg = {"llm": [{"name": "pair_compress", "layer": i, "window": T_w, "ratio": r, "memory_floor": M,
                        "hidden_dim": hidden_dim, "num_heads": num_heads} for i in layers]}
        self.compression = build_pipeline(cfg, dim=self.lm.hidden_size).llm  # validated options, bound below
        self.layer_idx = layers
        self.lm.bind_stages(self.compression)  # refuses a layer outside 1..num_layers-1 now, not at the first call

    def trainable_share(self) -> float:
        """Share of all parameters that train (the compressors and scorers)."""
        total = sum(p.numel() for p in self.parameters())
        return sum(p.numel() for p in self.parameters() if p.requires_grad) / total

    @staticmethod
    def _positions(attention_mask: Tensor) -> Tensor:
        return (attention_mask.long().cumsum(1) - 1).clamp(min=0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None):
        """Left-padded ``input_ids`` (B, L) -> ``(loss or None, logits (B, L, V))``; positions merged away have
        zero logits (the window's are exact). ``loss``: :func:`windowed_lm_loss` on the last ``T_w``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits, _ = self.lm(self.lm.embed(input_ids), attention_mask, self._positions(attention_mask),
                            stages=self.compression)
        loss = None if labels is None else windowed_lm_loss(logits, labels, self.window, attention_mask)
        return loss, logits

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 32,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0, **kwargs) -> Tensor:
        """Greedy (or sampled: ``do_sample`` ...) new tokens (B, T) from left-padded prompts, the prefill through
        the compressed layers (``generate_from_embeds``)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        eos = eos_token_id if eos_token_id is not None else (self.lm.config.eos_token_id or [])
        return generate_from_embeds(self.lm, self.lm.embed(input_ids), attention_mask, self._positions(attention_mask),
                                    max_new_tokens, eos, pad_token_id, stages=self.compression, **kwargs)
