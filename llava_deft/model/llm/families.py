"""Per-family adapters: how our layer loop reaches the pieces of one HF causal LM family.

The loop (``DecoderLM.forward``, ``LLMStages.prefill/decode``, ``StaticDecoder``) is written once against
:class:`Family`; each family of HF models says, in one small class, where its pieces are and how its
decoder layer is called:

- ``embed_tokens`` / ``layers`` / ``head``: the token embedding, the decoder layers, the LM head;
- ``inputs(embeds, positions)``: the hidden states layer 0 reads (Llama: the embeddings; GPT-2: embeddings
  + ``wpe(positions)``, then the embedding dropout);
- ``position_embeddings(hidden, positions)``: a tuple of per-position tensors ``(B, L, .)`` every layer
  needs (RoPE ``(cos, sin)``; GPT-2: ``()``). The loop rebuilds it after a stage drops or merges tokens and
  gathers its rows for a probe's queries, whatever it holds;
- ``call(layer, hidden, mask, pe, positions, cache, use_cache)``: one decoder layer;
- ``norm(hidden)``: the final norm;
- ``queries`` / ``keys`` / ``scaling``: the attention probe's inputs (``probe.attention_probe``): a layer's
  queries ``(B, H, Q, d)`` and keys ``(B, H_kv, L, d)`` for its INPUT hidden states, exactly as its
  attention computes them (keys as it caches them), and its softmax scale.

Adding a family is one more class here with ``@register_family("model_type", ...)``; ``FAMILIES`` is the
only list (``decoder.SUPPORTED_MODEL_TYPES`` is read from it). An adapter holds a reference to the HF
model and reads its modules on every call, so modules replaced in place (peft's LoRA) are the ones used.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn

from .probe import project_keys, project_queries

__all__ = ["FAMILIES", "Family", "GPT2Family", "RopeFamily", "family_of", "kv_heads_of", "register_family"]

FAMILIES: dict[str, type["Family"]] = {}


def register_family(*model_types: str):
    """Class decorator: the adapter of HF ``config.model_type`` s ``model_types``; a duplicate raises."""

    def add(cls: type["Family"]) -> type["Family"]:
        for model_type in model_types:
            if model_type in FAMILIES:
                raise ValueError(f"model_type {model_type!r} already has the adapter {FAMILIES[model_type].__name__}")
            FAMILIES[model_type] = cls
        return cls

    return add


def kv_heads_of(config) -> int:
    """Key/value heads per layer: ``num_key_value_heads`` (GQA) where the architecture has them; GPT-2 has
    none (every head has its own keys), whatever stray attribute its config carries."""
    heads = config.num_attention_heads
    if getattr(config, "model_type", None) == "gpt2":
        return heads
    return getattr(config, "num_key_value_heads", None) or heads


def family_of(hf_model: nn.Module, where: str) -> "Family":
    """The adapter of ``hf_model`` (by ``config.model_type``); ``ValueError`` naming ``where`` and the
    supported types otherwise."""
    model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported LLM model_type {model_type!r} ({where}); supported: {list(FAMILIES)}")
    return FAMILIES[model_type](hf_model)


class Family(ABC):
    """The interface of an adapter (see the module docstring for what each method gives)."""

    def __init__(self, hf_model: nn.Module):
        self.hf = hf_model

    @property
    @abstractmethod
    def embed_tokens(self) -> nn.Module:
        """The token embedding: (B, L) ids -> (B, L, D)."""

    @property
    @abstractmethod
    def layers(self) -> nn.ModuleList:
        """The decoder layers, in order."""

    @property
    def head(self) -> nn.Module:
        """The LM head: (B, L, D) -> (B, L, V)."""
        return self.hf.lm_head

    @abstractmethod
    def inputs(self, embeds: Tensor, positions: Tensor) -> Tensor:
        """(B, L, D) embeddings at (B, L) positions -> the (B, L, D) hidden states layer 0 reads."""

    @abstractmethod
    def position_embeddings(self, hidden: Tensor, positions: Tensor) -> tuple[Tensor, ...]:
        """Per-position tensors (B, L, .) every layer takes, for (B, L) positions."""

    @abstractmethod
    def call(self, layer: nn.Module, hidden: Tensor, mask, pe: tuple[Tensor, ...], positions: Tensor, cache,
             use_cache: bool, cache_kw: str) -> Tensor:
        """One decoder layer: (B, L, D) -> (B, L, D), its keys and values added to ``cache`` (by keyword
        ``cache_kw``, see ``runtime.cache_kwarg``) when given."""

    @abstractmethod
    def norm(self, hidden: Tensor) -> Tensor:
        """The final norm, before the head."""

    @abstractmethod
    def queries(self, layer: nn.Module, hidden: Tensor, pe: tuple[Tensor, ...]) -> Tensor:
        """``layer``'s queries for its input ``hidden`` (B, Q, D) with ``pe`` of those rows -> (B, H, Q, d)."""

    @abstractmethod
    def keys(self, layer: nn.Module, hidden: Tensor, pe: tuple[Tensor, ...]) -> Tensor:
        """``layer``'s keys for its input ``hidden`` (B, L, D) -> (B, H_kv, L, d), as it caches them."""

    @abstractmethod
    def scaling(self, layer: nn.Module) -> float:
        """The softmax scale of ``layer``'s attention."""


@register_family("llama", "qwen2", "qwen3")
class RopeFamily(Family):
    """Llama, Qwen2, Qwen3: ``model.{embed_tokens, layers, rotary_emb, norm}``, ``lm_head``; RoPE applied inside
    each layer from ``position_embeddings=(cos, sin)``; q/k from ``q_proj``/``k_proj`` (+ ``q_norm``/``k_norm``)."""

    @property
    def embed_tokens(self) -> nn.Module:
        return self.hf.model.embed_tokens

    @property
    def layers(self) -> nn.ModuleList:
        return self.hf.model.layers

    def inputs(self, embeds: Tensor, positions: Tensor) -> Tensor:
        return embeds  # positions enter through RoPE, inside every layer

    def position_embeddings(self, hidden: Tensor, positions: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.hf.model.rotary_emb(hidden, positions))  # (cos, sin), each (B, L, head_dim)

    def call(self, layer, hidden, mask, pe, positions, cache, use_cache, cache_kw):
        return layer(hidden, attention_mask=mask, position_embeddings=pe, position_ids=positions,
                     use_cache=use_cache, **{cache_kw: cache})

    def norm(self, hidden: Tensor) -> Tensor:
        return self.hf.model.norm(hidden)

    def queries(self, layer, hidden, pe):
        return project_queries(layer, hidden, *pe)

    def keys(self, layer, hidden, pe):
        return project_keys(layer, hidden, *pe)

    def scaling(self, layer) -> float:
        return layer.self_attn.scaling


@register_family("gpt2")
class GPT2Family(Family):
    """GPT-2 (``GPT2LMHeadModel``): ``transformer.{wte, wpe, drop, h, ln_f}``, ``lm_head`` (tied to ``wte``).

    Positions are absolute and learned: ``wpe(position_ids)`` is added to the input embeddings once, before
    block 0, with OUR positions as given (gaps included: a kept token keeps its original position's
    embedding); the blocks take no positional input (``position_embeddings`` is ``()``). A layer stage that
    drops or merges tokens after block i changes nothing positional: the survivors carry their position in
    their hidden states. Queries and keys come from the block's fused ``attn.c_attn`` (a Conv1D giving
    q | k | v) on ``ln_1`` of the input, split into heads; no RoPE, one KV head per query head.
    """

    @property
    def embed_tokens(self) -> nn.Module:
        return self.hf.transformer.wte

    @property
    def layers(self) -> nn.ModuleList:
        return self.hf.transformer.h

    def inputs(self, embeds: Tensor, positions: Tensor) -> Tensor:
        wpe = self.hf.transformer.wpe
        return self.hf.transformer.drop(embeds + wpe(positions).to(embeds.dtype))  # (B, L, D)

    def position_embeddings(self, hidden: Tensor, positions: Tensor) -> tuple[Tensor, ...]:
        return ()

    def call(self, layer, hidden, mask, pe, positions, cache, use_cache, cache_kw):
        return layer(hidden, attention_mask=mask, position_ids=positions, use_cache=use_cache, **{cache_kw: cache})

    def norm(self, hidden: Tensor) -> Tensor:
        return self.hf.transformer.ln_f(hidden)

    @staticmethod
    def _split(layer: nn.Module, hidden: Tensor, which: int) -> Tensor:
        """Part ``which`` (0 q, 1 k) of ``c_attn(ln_1(hidden))``: (B, L, D) -> (B, H, L, d)."""
        attn = layer.attn
        x = layer.ln_1(hidden)
        b, n, _ = x.shape
        part = attn.c_attn(x).split(attn.split_size, dim=2)[which]  # (B, L, D)
        return part.view(b, n, -1, attn.head_dim).transpose(1, 2)  # (B, H, L, d)

    def queries(self, layer, hidden, pe):
        return self._split(layer, hidden, 0)

    def keys(self, layer, hidden, pe):
        return self._split(layer, hidden, 1)

    def scaling(self, layer) -> float:
        return layer.attn.scaling  # 1/sqrt(d) (scale_attn_weights), / (layer_idx + 1) if scale_attn_by_inverse_layer_idx
