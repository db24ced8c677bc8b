"""Attention probe: the attention scores an LLM stage needs, from a decoder layer's own projections.

The model keeps running SDPA (or flash) attention; a stage that needs scores (FastV, TOVA, H2O,
SnapKV) gets them from this side computation, as kvpress does: the asking positions' queries are
projected again with the layer's ``input_layernorm``, ``q_proj``, ``q_norm`` (Qwen3) and RoPE, and
scored against the layer's keys -- those in the cache (already normed and rotated), or recomputed with
``k_proj`` / ``k_norm`` when there is no cache. Query heads are grouped by the KV head they read
(GQA), so keys are never repeated. Tested equal to eager attention weights for Llama, Qwen2 and Qwen3
(tests/test_llm_stages.py).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

__all__ = ["attention_probe", "project_keys", "project_queries"]


def _rotate(attn: nn.Module, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE of ``x`` (B, H, L, d) with (B, L, d) cos/sin, by the model family's own ``rotate_half``."""
    rotate_half = sys.modules[type(attn).__module__].rotate_half
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


def _project(layer: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor, proj: str, norm: str) -> Tensor:
    """``input_layernorm`` -> ``self_attn.<proj>`` -> per-head ``<norm>`` (Qwen3) -> RoPE: (B, L, D) -> (B, h, L, d)."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    b, n, _ = x.shape
    states = getattr(attn, proj)(x).view(b, n, -1, attn.head_dim)
    if getattr(attn, norm, None) is not None:
        states = getattr(attn, norm)(states)
    return _rotate(attn, states.transpose(1, 2), cos, sin)


def project_queries(layer: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Queries of decoder ``layer`` for its INPUT hidden states ``hidden`` (B, Q, D) -> (B, H, Q, d)."""
    return _project(layer, hidden, cos, sin, "q_proj", "q_norm")


def project_keys(layer: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Keys of decoder ``layer`` for its input ``hidden`` (B, L, D) -> (B, H_kv, L, d), as it caches them."""
    return _project(layer, hidden, cos, sin, "k_proj", "k_norm")


def attention_probe(queries: Tensor, keys: Tensor, allowed: Tensor, scaling: float,
                    bias: Tensor | None = None) -> Tensor:
    """Softmax attention probabilities (B, H, Q, T), float32.

    queries (B, H, Q, d); keys (B, H_kv, T, d) with H a multiple of H_kv (query head h reads KV head
    h // (H / H_kv), transformers' ``repeat_kv`` order); ``allowed`` bool, broadcastable to
    (B, H_kv, 1 or Q, T) (or (B, H, Q, T)): which keys each query may attend to. A query with no allowed
    key (a padding position) gets all-zero probabilities. ``bias`` (B, H_kv or 1, T): added to every
    query's logits of that key, as the model's attention adds it (merged keys' ``log(size)``).
    """
    b, h, q, d = queries.shape
    hkv, t = keys.shape[1], keys.shape[2]
    g = h // hkv
    logits = torch.matmul(queries.reshape(b, hkv, g * q, d), keys.transpose(-1, -2))  # (B, H_kv, G*Q, T)
    logits = logits.view(b, hkv, g, q, t).float() * scaling
    if bias is not None:
        logits = logits + bias.float()[:, :, None, None, :]
    if allowed.dim() == 4 and allowed.shape[1] == h and h != hkv:
        allowed = allowed.view(b, hkv, g, *allowed.shape[2:])
    else:
        allowed = allowed.unsqueeze(2)  # (B, H_kv or 1, 1, Q or 1, T)
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with nothing allowed
    return probs.view(b, h, q, t)
